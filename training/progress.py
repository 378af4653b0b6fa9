"""Progress of a long stage, the one way every stage and command reports it.

`progress(description, total, initial=0)` returns `advance(n, postfix=None)`: on a terminal a
tqdm bar; in a log file (CI, docker logs) one INFO line at most every 30 s with the rate and
the ETA, so a long stage is never silent. Stages take such a factory as their `progress`
argument (None: silent).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger("ovd")


def progress(desc: str, total: int, initial: int = 0):
    """Progress with ETA; returns `advance(n, postfix=None)`.

    A terminal gets a tqdm bar; a log file (CI, docker logs) gets a line at most every 30 s
    with the rate and the ETA, so a long stage is never silent.
    """
    if sys.stderr.isatty():
        bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)

        def advance(n: int, postfix: dict | None = None) -> None:
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return advance

    state = {"n": initial, "t0": time.time(), "last": time.time()}

    def advance_log(n: int, postfix: dict | None = None) -> None:
        state["n"] += n
        now = time.time()
        if now - state["last"] < 30 and state["n"] < total:
            return
        state["last"] = now
        rate = (state["n"] - initial) / max(now - state["t0"], 1e-9)
        eta = (total - state["n"]) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={v}" for k, v in (postfix or {}).items())
        logger.info("%s: %d/%d (%.1f it/s, ETA %s) %s", desc, state["n"], total, rate,
                    time.strftime("%M:%S", time.gmtime(eta)) if eta < 3600 else f"{eta / 60:.0f} min",
                    extra)

    return advance_log
