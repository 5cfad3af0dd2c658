"""The project's exception tree. Third-party errors are mapped onto it where they enter.

    ChatbotError
    ├── SettingsError        a setting is unknown or has a wrong value (start-up)
    ├── ModelLoadError       the model or tokenizer could not be loaded or prepared
    ├── StoreUnavailable     Redis could not be reached (after retries)
    ├── RedisServerError     the embedded redis-server could not be started
    ├── GenerationError      the engine failed on a request
    └── DataError            a dialogue file for training or evaluation is malformed

Users never see these messages; they see `POLITE_FAILURE` or a text chosen by the adapter.
Operators see the message and the traceback in the log.
"""

from __future__ import annotations

POLITE_FAILURE = (
    "Sorry, something went wrong on my side and I couldn't answer that. "
    "Please try again in a moment, or ask for a human if it keeps happening."
)


class ChatbotError(Exception):
    """Root of every error this project raises on purpose."""


class SettingsError(ChatbotError):
    pass


class ModelLoadError(ChatbotError):
    pass


class StoreUnavailable(ChatbotError):
    pass


class RedisServerError(ChatbotError):
    pass


class GenerationError(ChatbotError):
    pass


class DataError(ChatbotError):
    """Names the file, the entry and the problem."""
