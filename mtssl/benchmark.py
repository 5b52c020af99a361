r"""Benchmarks of the training steps and the input pipelines.

  python -m mtssl.benchmark                                   # everything
  python -m mtssl.benchmark --what=steps --tasks=col --precisions=bf16 \
      --xla=true --batch_size=64                              # one GPU figure
  python -m mtssl.benchmark --what=pipelines                  # inputs only

Steps (`--what=steps`). For every combination of `--precisions` (fp32, bf16,
fp16), `--xla` and `--native_atrous`, the model is built exactly as the
trainer builds it (mtssl.training.core): the mixed-precision policy is set
before anything is built, one MultiTaskModel holds the trunk and every task's
head, every task has its own TF1 RMSProp (loss-scaled under fp16) and its own
`TaskTrainStep` (XLA-compiled with `--xla`). Each task's step then runs on
one constant, device-resident batch (so input is not measured):
`--warmup_steps` untimed steps (the first one traces and compiles; its time
is reported as `compile_s`), then `--windows` windows of `--steps` timed
steps, each closed by a read of the loss, which waits for the device. The
step time is the median of the windows' mean step times (`step_s`; the
fastest window's is `step_s_min`). With several tasks a `multi` row times
round-robin cycles of one step of every task, the trainer's schedule.
Reported per row: step time, training examples/s, the forward
multiply-accumulates per example counted from the model's own graph
(mtssl.benchmarking.flops: trunk, with the task's trunk_images expansion,
plus head), training FLOPs per example (2 FLOPs per MAC, x3 for forward and
backward), achieved TFLOP/s, model-FLOP utilization against the device's
peak (`--peak_tflops`, or the table of known accelerators in
mtssl.benchmarking.environment; none on a CPU) and the GPU's peak memory
during the task's steps. For the paper's configuration the count is set
beside the paper model's reference count.

Pipelines (`--what=pipelines`). Each task's real input pipeline
(`Task.make_dataset`) reads images held in memory, decoded (`memory`: the
preprocessing alone) or JPEG-encoded (`jpeg`: with the project's decoder, as
folder and TFDS sources decode), and is timed on one thread and on all
cores, per second of wall time and of process CPU time (the stable one on a
shared machine); beside them the same preprocessing written per image with
NumPy/OpenCV on one thread (mtssl.benchmarking.reference_pipelines), and
how many cores the pipeline needs to feed one accelerator at `--target_mfu`
of `--target_peak_tflops`.

Results go to `<output_dir>/<name>.json` and `.md` (atomic writes), with the
device, versions, flags, batch sizes and the machine's load average before
and after. Nothing here asserts a timing. Flags are generated from
mtssl.configs.benchmark; a bad one prints one line `error: ...` and exits
with status 2.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from mtssl.configs import base as config_base
from mtssl.benchmarking import runner
from mtssl.benchmarking.settings import BenchmarkError
from mtssl.configs import benchmark as configs
from mtssl.data import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

EXIT_USAGE = 2


def main(argv, flag_values=None) -> int:
  """Runs the benchmark the flags describe; the exit status."""
  fv = flag_values if flag_values is not None else flags.FLAGS
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return EXIT_USAGE
  try:
    config = configs.config_from_flags(fv)
    command = ' '.join(['python -m mtssl.benchmark']
                       + configs.given_flags(fv))
    _, paths = runner.run_benchmark(config, command)
  except (BenchmarkError, configs.ConfigError, sources.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  print(f'Wrote {paths["json"]} and {paths["markdown"]}')
  return 0


def run():
  configs.define_flags()
  app.run(main, flags_parser=config_base.parse_command_line)


if __name__ == '__main__':
  run()
