"""DDIP's diagnostics: the data-consistency record, the progress fields and the per-step timing report.

Pure functions of what the reconstructor keeps (the Poisson log-likelihood of the warm start, of the output after
every ``run.loglik_every``-th diffusion step and the last, and after the final EM stage; seconds and counts by part).
"""

from __future__ import annotations

from typing import Any


def data_consistency(warm_start: float | None, history: list[float], final_em: float | None,
                     steps: list[int] | None = None) -> dict[str, Any]:
    """The data-consistency diagnostic of a run (for the run record).

    Returns
    -------
    dict
        ``loglik_warm_start`` (the MLEM/OSEM warm start), ``loglik_output`` (the current output), ``loglik_gain``
        (output − warm start: negative = the output explains the data worse than the warm start),
        ``loglik_per_step`` (after the diffusion steps ``loglik_steps``, 1-based: every ``run.loglik_every``-th
        and the last; every step when ``steps`` is None) and ``loglik_final_em`` when that stage ran. All are
        STIR's Poisson log-likelihood ``Σ y log ŷ − ŷ`` with constants dropped (larger = closer to the data).
    """
    out: dict[str, Any] = {"loglik_warm_start": warm_start,
                           "loglik_per_step": [float(f"{v:.8g}") for v in history],
                           "loglik_steps": [int(v) for v in (steps if steps is not None
                                                              else range(1, len(history) + 1))]}
    last = final_em if final_em is not None else (history[-1] if history else warm_start)
    out["loglik_output"] = last
    if last is not None and warm_start is not None:
        out["loglik_gain"] = float(last - warm_start)
    if final_em is not None:
        out["loglik_final_em"] = final_em
    return out


def progress_fields(t: int | None, last_loss: float | None, warm_start: float | None, history: list[float],
                    final_em: float | None, seconds: float, steps: int,
                    loglik_step: int | None = None) -> dict[str, Any]:
    """The fields of a progress line: the step's ``t``, the fine-tuning loss, the latest log-likelihood and its
    gain (with ``loglik_step``, the step it was computed after, when given), s/step."""
    info: dict[str, Any] = {}
    if t is not None:
        info["t"] = int(t)
    if last_loss is not None:
        info["loss"] = float(f"{last_loss:.4g}")
    if history:
        last = final_em if final_em is not None else history[-1]
        info["loglik"] = float(f"{last:.8g}")
        if warm_start is not None:
            info["dloglik"] = float(f"{last - warm_start:.5g}")
        if loglik_step is not None:
            info["loglik_step"] = int(loglik_step)
    if steps > 0 and seconds:
        info["s/step"] = round(seconds / steps, 3)
    return info


def timing_report(timings: dict[str, float], steps: int) -> dict[str, float]:
    """Mean seconds per diffusion step by part (network forward, fine-tune backward, projector, EM, total)."""
    n = max(1, steps)
    out = {k: v / n for k, v in timings.items() if k != "init"}
    out["init_total"] = timings.get("init", 0.0)
    return out


class DiagnosticsMixin:
    """The diagnostics of :class:`~sirf_ddip.recon.ddip.DDIPReconstructor` (its ``loglik_*``, ``timings``,
    ``counts``, ``last_loss``)."""

    def data_consistency(self) -> dict[str, Any]:
        """The run's data-consistency record (:func:`data_consistency`)."""
        return data_consistency(self.loglik_warm_start, self.loglik_history, self.loglik_final_em,
                                self.loglik_steps)

    def progress_info(self) -> dict[str, Any]:
        """The fields of the progress line (:func:`progress_fields`)."""
        t = self.sampler.t(self.iteration - 1) if self.configured and self.iteration > 0 else None
        return progress_fields(t, self.last_loss, self.loglik_warm_start, self.loglik_history,
                               self.loglik_final_em, self.timings.get("total") or 0.0, self.iteration,
                               self.loglik_steps[-1] if self.loglik_steps else None)

    def timing_report(self) -> dict[str, float]:
        """Mean seconds per diffusion step by part (network forward, fine-tune backward, projector, EM, total)."""
        return timing_report(self.timings, self.iteration)
