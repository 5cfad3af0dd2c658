"""The container images' entry point: settings from secret files, then the command.

`entrypoint.py chatbot worker` runs `chatbot worker` after this: for every setting NAME
that `core.settings` knows (REDIS_URL, SLACK_BOT_TOKEN, CHATBOT_WATERMARK_KEY, …), a
variable NAME_FILE names a file whose content becomes NAME. Compose and Docker secrets
arrive as files under /run/secrets; a Kubernetes Secret can be mounted the same way. A
trailing newline in the file is dropped. Other `*_FILE` variables (SSL_CERT_FILE, …) are
left alone, and so is a `CHATBOT_*_FILE` that names no setting: the settings then refuse it
as unknown, like any typo.

The command replaces this process (exec), so it receives SIGTERM itself and drains.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

SUFFIX = "_FILE"


def load_secret_files(environ: MutableMapping[str, str]) -> list[str]:
    """Replace each NAME_FILE of a known setting by NAME; returns the names set."""
    from core.settings import Settings  # the image's installed project

    known = set(Settings.env_names())
    loaded = []
    for variable in sorted(environ):
        name = variable.removesuffix(SUFFIX)
        if not variable.endswith(SUFFIX) or name not in known:
            continue
        if name in environ:
            raise SystemExit(f"entrypoint: both {name} and {variable} are set: keep one")
        path = Path(environ.pop(variable))
        try:
            environ[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"entrypoint: {variable}={path}: cannot read it ({exc})") from None
        loaded.append(name)
    return loaded


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: entrypoint.py COMMAND [ARG…]   (e.g. chatbot worker)")
    load_secret_files(os.environ)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
