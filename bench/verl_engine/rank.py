"""rank.py — one torchrun rank of bench_verl_engine.py: verl's own SFT entry point
(verl.trainer.sft_trainer.main, Hydra, the command-line overrides as given) with three probes and
nothing else changed:

  - every FileLogger record (rank 0 writes them, one per step, right after train_batch returns)
    gets `bench/time` = time.time(), so per-step wall time can be read from metrics.jsonl
    (verl logs no step time of its own; `train/mfu` hides it behind a device-FLOPS guess);
  - CheckpointHandler.save_checkpoint (verl always saves after the last step) first records this
    rank's peak RSS so far, the peak of training alone, and the time the save takes;
  - at exit this rank writes {rank, peak RSS of training, of the whole process, threads, times}
    to $BENCH_RANK_DIR/rank<RANK>.json. getrusage(RUSAGE_SELF) is this rank's own process
    (num_workers=0: no data-loader children), not the launcher.

One intra-op thread: OMP_NUM_THREADS=1 in the environment and torch.set_num_threads(1) here; the
verlcpp engine runs its libtorch ops in this same process, so the setting holds for both sides.
"""
import json
import os
import resource
import sys
import time

T_START = time.time()


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from verl.utils import tracking
    from verl.utils.checkpoint import checkpoint_handler

    probe = {"rank": int(os.environ.get("RANK", "0")), "t_start": T_START}

    log = tracking.FileLogger.log

    def timed_log(self, data, step):
        return log(self, dict(data, **{"bench/time": time.time()}), step)

    tracking.FileLogger.log = timed_log

    save = checkpoint_handler.CheckpointHandler.save_checkpoint

    def probed_save(self, *args, **kwargs):
        probe["peak_rss_train_mib"] = rss_mib()
        probe["t_save_start"] = time.time()
        try:
            return save(self, *args, **kwargs)
        finally:
            probe["t_save_end"] = time.time()

    checkpoint_handler.CheckpointHandler.save_checkpoint = probed_save

    from verl.trainer import sft_trainer

    sys.argv[0] = sft_trainer.__file__  # Hydra names the job after it
    status = 0
    try:
        sft_trainer.main()
    except SystemExit as e:  # Hydra exits 1 after printing the error
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:
        status = 1
        raise
    finally:
        probe.update(peak_rss_mib=rss_mib(), t_end=time.time(), threads=torch.get_num_threads(), status=status)
        out = os.environ.get("BENCH_RANK_DIR")
        if out:
            with open(os.path.join(out, f"rank{probe['rank']}.json"), "w") as f:
                json.dump(probe, f)
    return status


if __name__ == "__main__":
    sys.exit(main())
