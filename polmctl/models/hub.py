"""Fail fast when the Hugging Face hub cannot be reached at all.

    polmctl run recipe=lora model.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct   # no network: one line, at once

Without ``HF_HUB_OFFLINE``, huggingface_hub retries an unreachable hub with backoff (56 s on a machine
without DNS) before transformers gives up. huggingface_hub detects only the offline mode a user sets,
not an unreachable hub, so one HEAD request to the hub's endpoint with a short timeout, through
huggingface_hub's own HTTP session (its endpoint, proxy and certificate settings), asks once per
process. A hub out of reach then loads a model already in the local cache from its snapshot dir,
without asking the hub again, or fails with one line.
"""

from __future__ import annotations

import functools

from polmctl.errors import ModelError

PROBE_TIMEOUT_S = 5


@functools.lru_cache(maxsize=None)
def unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (None: it answered, whatever the status)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as err:  # DNS, refused, timeout, TLS, proxy: each means no answer from the hub
        text = " ".join(str(err).split())
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return None


def hub_or_cache(repo_id: str, what: str, revision: str | None = None) -> str:
    """What ``from_pretrained`` should load for ``repo_id`` without waiting on a hub out of reach:
    ``repo_id`` itself when the hub answers (or HF_HUB_OFFLINE already keeps transformers from asking),
    else the local cache's snapshot dir of it, so nothing asks the hub again; a ModelError when the
    cache does not hold it either."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if constants.is_offline_mode():
        return repo_id
    reason = unreachable(constants.ENDPOINT)
    if reason is None:
        return repo_id
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"cannot load {repo_id!r} ({what}): the Hugging Face hub at {constants.ENDPOINT} cannot be reached "
            f"({reason}) and the local cache does not hold it; check the network (or HF_ENDPOINT), or use a "
            "local dir or builtin:smollm2-135m"
        ) from None
