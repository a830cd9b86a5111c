"""`ntk-server`: run the service. Flags and NTK_* environment variables, see --help."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from ntk_server.config import ServerConfig, load_config


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any).

    A record logged with `extra={"fields": {...}}` (the per-request line) adds those keys, so
    log pipelines can filter on method, code or seconds without parsing the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: ServerConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ValueError as exc:
        print(f"ntk-server: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    from ntk_server.server import serve  # torch import after argument errors are reported

    try:
        asyncio.run(serve(config))
    except (ValueError, RuntimeError) as exc:
        logging.getLogger("ntk_server").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
