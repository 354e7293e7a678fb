"""The one training loop of Fast-ODE: image flows (train_reverse_img_ddp.py), distillation and reflow (distill.py).

The loop owns what every run shares: the iteration range, the progress bar (and progress lines in logs that
are not a terminal), SIGTERM / SIGINT (one path: the signal is noticed at a step boundary, every rank agrees,
the state is saved first, the run says how to continue), and when to log, evaluate and save. A task owns its
networks and files; it provides

    step(iteration)                      one optimizer step
    check(iteration)                     stop with one line when the run cannot go on (non-finite losses or
                                         weights); called before the iteration's first file (sample, record, save)
    evaluate(iteration)                  sample grids / test loss (rank 0 only), merged into the next stats record
    write_stats(iteration, progress)     one stats.jsonl record and log line
    save(iteration, numbered, final)     the files of a save step

and ``log`` (a utils.train.RunLog). :class:`Schedule` says when each happens.
"""
import contextlib
from dataclasses import dataclass

from utils.console import progress_bar
from utils.train import RankAgreement, StopSignals


@dataclass(frozen=True)
class Schedule:
    """Every how many iterations each event happens (all also at the last iteration)."""
    log_every: int
    evaluate_every: int
    save_every: int                 # numbered files (``numbered=True`` in ``save``)
    snapshot_every: int             # the resumable state alone
    log_with_evaluation: bool = False   # also write a stats record at every evaluation (distill.py's test loss)


class ConsoleLog:
    """A task's ``log`` that only prints (for runs that keep no log.txt)."""

    def line(self, text):
        print(text, flush=True)

    def close(self):
        pass


CONTINUE_HINT = "continue with the same command and --resume auto"


def run(task, start, iterations, schedule, desc, is_main=True, agreement=None, closing=(), stop_hint=CONTINUE_HINT,
        **progress_options):
    """Iterations ``start`` .. ``iterations`` of ``task``; returns the signal name when stopped by one, else None.

    ``closing``: context managers closed with the loop (thread pools, the log), before an error is printed;
    ``stop_hint``: what the stop line tells the user to do; ``progress_options`` go to the progress bar."""
    if start > iterations:
        task.log.line(f"nothing to do: the state is at iteration {start - 1} and --iterations is {iterations}; "
                      f"raise --iterations to train longer")
        return None
    agreement = agreement or RankAgreement(False)
    progress = progress_bar(total=iterations, initial=start - 1, disable=not is_main, dynamic_ncols=True, desc=desc,
                            **progress_options)
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(StopSignals())
        stack.enter_context(progress)
        stack.enter_context(contextlib.closing(task.log))
        for manager in closing:
            stack.enter_context(manager)
        for iteration in range(start, iterations + 1):
            task.step(iteration)
            # Step boundary: every rank takes the same decisions from here on.
            stop = agreement.any(signals.received is not None)
            last = iteration == iterations
            numbered = iteration % schedule.save_every == 0
            evaluated = iteration % schedule.evaluate_every == 0 or last
            logged = (iteration % schedule.log_every == 0 or last or stop
                      or (evaluated and schedule.log_with_evaluation))
            saved = numbered or iteration % schedule.snapshot_every == 0 or last or stop
            if evaluated or logged or saved:   # before any file of this iteration: a stop writes none
                task.check(iteration)
            if stop:   # the state first: Ctrl-C through `| tee` has closed the console already
                task.save(iteration, numbered, final=last)
            progress.update(1)
            if is_main and evaluated:
                task.evaluate(iteration)
            if logged:
                task.write_stats(iteration, progress)
            if saved and not stop:
                task.save(iteration, numbered, final=last)
            if stop:
                task.log.line(f"stopped by {signals.received or 'a signal to another rank'} at iteration "
                              f"{iteration}; {stop_hint}")
                return signals.received or "signal"
    return None
