from bot.slack.format import escape, markdown_to_mrkdwn


def test_emphasis_links_headings_and_lists() -> None:
    text = (
        "# Title\n**bold**, __bold__, *italic*, ~~gone~~\n- one\n* two\n[docs](https://x.io/a?b=1)"
    )
    assert markdown_to_mrkdwn(text) == (
        "*Title*\n*bold*, *bold*, _italic_, ~gone~\n• one\n• two\n<https://x.io/a?b=1|docs>"
    )


def test_special_characters_are_escaped_outside_code_only() -> None:
    text = "a < b & c > d\n```js\nif (a < b && c) {}\n```\n`x<y`"
    assert markdown_to_mrkdwn(text) == (
        "a &lt; b &amp; c &gt; d\n```\nif (a &lt; b &amp;&amp; c) {}\n```\n`x&lt;y`"
    )


def test_code_keeps_its_asterisks() -> None:
    assert markdown_to_mrkdwn("`a**2*b` and **x**") == "`a**2*b` and *x*"


def test_the_model_cannot_ping_everyone() -> None:
    converted = markdown_to_mrkdwn("Hi @everyone and <!here|here> and <!channel>")
    assert "@everyone" not in converted and "<!" not in converted


def test_a_link_cannot_smuggle_a_mention_out() -> None:
    out = markdown_to_mrkdwn("see [x](https://a/><!subteam^S0123|@support>) and <@U999>")
    assert "<!subteam" not in out and "<@U999>" not in out
    assert "&lt;!subteam^S0123" in out
    assert markdown_to_mrkdwn("[docs](https://a.example/?a=1&b=2)") == (
        "<https://a.example/?a=1&amp;b=2|docs>"
    )


def test_escape_shows_markup_as_text() -> None:
    assert escape("<!channel> & <@U1>") == "&lt;!channel&gt; &amp; &lt;@U1&gt;"
