"""A chat-completions client for any OpenAI-compatible endpoint: the LLM judge of MMHal-Bench.

It speaks the ``POST {url}/chat/completions`` protocol (OpenAI, vLLM's and llama.cpp's servers, most
hosted gateways) with the standard library only, at temperature 0, retrying transient failures
(connection errors, HTTP 429 and 5xx) with exponential back-off. The key is read from the environment
variable the config names, never from the config itself, so configs can be shared.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from misp.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    """Where the LLM judge runs."""

    url: str | None = None
    """Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1;
    None reads the MISP_JUDGE_URL environment variable (no judge when both are unset)."""
    model: str = "gpt-4-0314"
    """The judge model; MMHal-Bench's published numbers use gpt-4-0314."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a Bearer token; a local server may need none)."""
    timeout_s: float = 120.0
    """Seconds to wait for one answer."""
    retries: int = 5
    """Further tries after a transient failure (connection error, HTTP 429 or 5xx)."""

    def resolved_url(self) -> str | None:
        """The configured URL, or MISP_JUDGE_URL, without a trailing slash; None when neither is set."""
        url = self.url or os.environ.get("MISP_JUDGE_URL") or None
        return url.rstrip("/") if url else None


class JudgeError(UserError):
    """The judge endpoint refused or failed a request after every retry."""


class ChatJudge:
    """Sends one user message and returns the reply's text.

    Args:
        config: The endpoint, model and key variable.
    """

    def __init__(self, config: JudgeConfig) -> None:
        url = config.resolved_url()
        if url is None:
            raise ConfigError("no LLM judge configured: set --judge.url (or MISP_JUDGE_URL) to an "
                              "OpenAI-compatible endpoint")
        if config.retries < 0 or config.timeout_s <= 0:
            raise ConfigError(f"judge.retries must be >= 0 and judge.timeout_s > 0, got {config.retries}, "
                              f"{config.timeout_s}")
        self.config = config
        self.endpoint = f"{url}/chat/completions"

    def __call__(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
        }).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        delay = 1.0
        for attempt in range(self.config.retries + 1):
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    reply = json.loads(response.read().decode())
                return str(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200]
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"judge {self.endpoint} refused the request: HTTP {e.code} {detail}") from None
                reason = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = str(getattr(e, "reason", e))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise JudgeError(f"judge {self.endpoint} answered without choices[0].message.content: {e}") from None
            if attempt < self.config.retries:
                log.warning("judge %s: %s; retrying in %.0f s", self.endpoint, reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise JudgeError(f"judge {self.endpoint} failed {self.config.retries + 1} times; last: {reason}")
