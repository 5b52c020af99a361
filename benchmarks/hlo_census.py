"""Kernel census of each task's compiled training step, from its HLO.

Builds the step the step benchmark builds (`TaskTrainStep(jit_compile=True)`
on the preset's trunk and heads) and reads two HLO stages from TensorFlow:

  hlo            before XLA's optimizations: the operations the step asks
                 for (counted by opcode, attributed to their TensorFlow op
                 by the HLO metadata);
  optimized_hlo  after the CPU backend's optimizations: its fusions and the
                 kernels left between them. The GPU backend fuses
                 differently, so this stage shows structure, not the GPU's
                 kernel count.

Usage (from the repository root):

  PYTHONPATH=$PWD python benchmarks/hlo_census.py --preset paper \\
      --tasks rp,ex,ms,col --precision bf16 --out /tmp/census.json
  python benchmarks/hlo_census.py --files DUMP/*after_optimizations.txt

`--device_preprocessing` turns rp's, col's and ex's preprocessing in the
step on, as the GPU preset runs them (their steps then hold the resizes,
warps, noise and colour work that moved from the input pipeline).
`--finite_check`, `--moving_statistics` and `--guard` pick the guarded
update's variants (mtssl/training/core.py) so the census compares them;
`--emit_xla DIR` also writes the replay bundle of each step
(shared/tools/xla-replay/prepare.py) for timing on a GPU.
"""

import argparse
import dataclasses
import collections
import json
import os
import re
import sys
import time

# Instruction lines: "[ROOT ]%name = SHAPE opcode(...)...". The opcode is the
# first lowercase word directly followed by "(" after the "=".
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(.*)$')
_OPCODE = re.compile(r'(?:^|[\s)}])([a-z][a-z0-9-]*)\(')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$')
_OP_TYPE = re.compile(r'op_type="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r'kind=(k\w+)')
_CALLS = re.compile(r'calls=%?([\w.-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRUE_FALSE = re.compile(r'(?:true|false)_computation=%?([\w.-]+)')
_TO_APPLY = re.compile(r'to_apply=%?([\w.-]+)')
_BODY = re.compile(r'(?:body|condition)=%?([\w.-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')

# Opcodes that launch no kernel of their own (views, tuples, constants).
FREE = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast',
        'after-all', 'partition-id', 'replica-id'}

# Attribution of an instruction to a part of the step, first match wins, by
# its TensorFlow op type and op name (HLO metadata).
CATEGORIES = (
    ('finite check', lambda t, n: (t in ('IsFinite', 'All', 'LogicalAnd')
                                   or '/finite_check/' in n
                                   or n.startswith('finite_check/'))),
    ('moving statistics', lambda t, n: ('moving_statistics' in n)),
    ('optimizer', lambda t, n: ('ApplyRMSProp' in t or n.startswith('RMSProp')
                                or '/RMSProp' in n)),
    ('weight decay', lambda t, n: ('/Regularizer/' in n
                                   or 'weight_decay' in n)),
    ('batch norm', lambda t, n: 'BatchNorm' in t),
    ('conv/matmul', lambda t, n: t.startswith('Conv2D')
     or t in ('DepthwiseConv2dNative', 'Einsum', 'MatMul', 'BatchMatMulV2')),
)


def parse(text):
  """({computation: [(opcode, rest of the line)]}, entry computation name)."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and ('->' in line or line.startswith('ENTRY')):
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op = _OPCODE.search(m.group(2))
    if op:
      computations[current].append((op.group(1), m.group(2)))
  return computations, entry


def executed_computations(computations, entry):
  """{name: role} of the computations that host kernels: the entry and,
  recursively, the branches ('branch 0' is a two-way conditional's true
  branch, which the step's apply takes; 'branch 1' the skip) and loop bodies
  it calls (not fusion bodies, reducers or other applied computations)."""
  seen, stack = {}, [(entry, 'entry')]
  while stack:
    name, role = stack.pop()
    if name in seen or name not in computations:
      continue
    seen[name] = role
    for opcode, attrs in computations[name]:
      if opcode == 'conditional':
        m = _BRANCHES.search(attrs)
        names = ([s.strip().lstrip('%') for s in m.group(1).split(',')] if m
                 else _TRUE_FALSE.findall(attrs))
        if not m and 'false_computation=' in attrs.split(
            'true_computation=')[0]:
          names.reverse()  # true first
        own = role.split(' in ')[0] if role != 'entry' else ''
        stack += [(n, f'branch {i}' + (f' in {own}' if own else ''))
                  for i, n in enumerate(names)]
      elif opcode == 'while':
        stack += [(n, 'loop') for n in _BODY.findall(attrs)]
  return seen


def category(attrs):
  t = (_OP_TYPE.search(attrs) or [None, ''])[1]
  n = (_OP_NAME.search(attrs) or [None, ''])[1]
  for label, test in CATEGORIES:
    if test(t, n):
      return label
  if n == 'XLA_Retvals' or n.startswith('XLA_'):
    return 'arguments/results'
  return 'other' if (t or n) else 'no metadata'


def kind(opcode, attrs):
  """A kernel's kind: convolution, fusion:<kLoop|kInput|kOutput|...>,
  custom-call:<target>, copy, conditional, while, or the opcode."""
  if opcode == 'fusion':
    m = _FUSION_KIND.search(attrs)
    return f'fusion:{m.group(1) if m else "?"}'
  if opcode == 'custom-call':
    m = _TARGET.search(attrs)
    return f'custom-call:{m.group(1) if m else "?"}'
  return opcode


def census(text):
  """Counts of one HLO module: kernels by kind and by part of the step."""
  computations, entry = parse(text)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  hosts = executed_computations(computations, entry)
  by_kind = collections.Counter()
  by_part = collections.defaultdict(collections.Counter)
  in_branches = collections.Counter()
  by_role = collections.Counter()
  by_role_kind = collections.defaultdict(collections.Counter)
  for name in hosts:
    for opcode, attrs in computations[name]:
      if opcode in FREE:
        continue
      if opcode == 'call':  # The CPU backend's parallelized kernels.
        inner = [(o, a) for o, a in computations.get(
            (_CALLS.search(attrs) or _TO_APPLY.search(attrs) or
             [None, ''])[1], []) if o not in FREE]
        if len(inner) == 1:
          opcode, attrs = inner[0]
      k = kind(opcode, attrs)
      part = category(attrs)
      by_kind[k] += 1
      by_part[part][k] += 1
      if name != entry:
        in_branches[part] += 1
      by_role[hosts[name]] += 1
      by_role_kind[hosts[name]][k] += 1
  return {'computations': len(computations),
          'executed_computations': len(hosts),
          'kernels': sum(by_kind.values()),
          'by_kind': dict(by_kind.most_common()),
          'by_part': {p: dict(c.most_common()) for p, c in sorted(by_part.items())},
          'in_branches': dict(in_branches.most_common()),
          'by_role': dict(sorted(by_role.items())),
          'by_role_kind': {r: dict(c.most_common())
                           for r, c in sorted(by_role_kind.items())},
          # What an applied step runs: all but the skip branch of the
          # top-level conditional (a branch-free step has none).
          'applied_path': sum(v for r, v in by_role.items()
                              if r != 'branch 1')}


def summary_row(c):
  k = c['by_kind']
  fusions = sum(v for n, v in k.items() if n.startswith('fusion'))
  custom = sum(v for n, v in k.items() if n.startswith('custom-call'))
  parts = {p: sum(v.values()) for p, v in c['by_part'].items()}
  return {'kernels': c['kernels'], 'applied path': c['applied_path'],
          'fusion': fusions,
          'convolution': k.get('convolution', 0), 'custom-call': custom,
          'copy': k.get('copy', 0),
          'conditional/while': k.get('conditional', 0) + k.get('while', 0),
          'reduce': k.get('reduce', 0), 'parts': parts}


def table(rows):
  """Markdown table of summary rows [(label, row)]."""
  cols = ['kernels', 'applied path', 'fusion', 'convolution', 'custom-call', 'copy',
          'conditional/while', 'reduce']
  parts = sorted({p for _, r in rows for p in r['parts']})
  head = ['step'] + cols + parts
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for label, r in rows:
    lines.append('| ' + ' | '.join([label] + [str(r[c]) for c in cols]
                                   + [str(r['parts'].get(p, 0)) for p in parts])
                 + ' |')
  return '\n'.join(lines)


def build(args):
  """{task: (step, features, labels, examples)} at the preset's size."""
  from mtssl.benchmarking import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from mtssl.benchmarking import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from mtssl.training import core  # pylint: disable=g-import-not-at-top
  from mtssl import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from mtssl.training import step as step_lib  # pylint: disable=g-import-not-at-top
  tasks = args.tasks.split(',')
  batch_sizes = None
  if args.batch_sizes:
    batch_sizes = {}
    for item in args.batch_sizes.split(','):
      name, _, value = item.partition('=')
      if not value.isdigit():
        raise SystemExit(f'--batch_sizes: expected task=N, got {item!r}')
      batch_sizes[name] = int(value)
  overrides = None
  if args.device_preprocessing:
    # The tasks that have the setting (rp, col, ex) get it on, as the GPU
    # preset does: their steps then hold the moved preprocessing.
    overrides = {n: {'device_preprocessing': True} for n in tasks
                 if 'device_preprocessing' in {
                     f.name for f in dataclasses.fields(
                         tasks_lib.get_task_class(n).config_class)}}
  settings = settings_lib.settings_from_preset(
      args.preset, tasks, trunk=args.trunk, batch_sizes=batch_sizes,
      task_overrides=overrides)
  task_objects = {n: settings_lib.make_task(n, c)
                  for n, c in settings.task_configs.items()}
  batches = settings_lib.first_batches(task_objects, settings.data, settings.seed)
  options = guard_options(args)
  policy = steps_lib.POLICIES[args.precision]
  out = {}
  with core.precision_policy(policy):
    model = core.build_model(settings.trunk, settings.output_stride,
                             task_objects, native_atrous=args.native_atrous,
                             seed=settings.seed)
    model.build_all({n: f for n, (f, _) in batches.items()})
    for n in settings.task_names:
      step = step_lib.TaskTrainStep(
          model, n, core.task_optimizer(n, 1e-4, policy), jit_compile=True,
          **options)
      features, labels = batches[n]
      examples = int(task_objects[n].examples_in(features))
      out[n] = (step, features, labels, examples)
  return out


def guard_options(args):
  options = {}
  for name in ('finite_check', 'moving_statistics', 'guard'):
    value = getattr(args, name)
    if value is not None:
      options[name] = value
  return options


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='paper', help='paper or cpu')
  parser.add_argument('--tasks', default='rp,ex,ms,col')
  parser.add_argument('--trunk', default=None)
  parser.add_argument('--batch_sizes', default='', help='task=N,...')
  parser.add_argument('--precision', default='bf16',
                      choices=('fp32', 'bf16', 'fp16'))
  parser.add_argument('--native_atrous', action='store_true')
  parser.add_argument('--device_preprocessing', action='store_true',
                      help='rp, col and ex with their preprocessing in the '
                      'step (as the GPU preset runs them)')
  parser.add_argument('--stages', default='hlo,optimized_hlo')
  parser.add_argument('--finite_check', default=None,
                      choices=('per_gradient', 'fused'))
  parser.add_argument('--moving_statistics', default=None,
                      choices=('snapshot', 'deferred'))
  parser.add_argument('--guard', default=None, choices=('cond', 'select'))
  parser.add_argument('--label', default='', help='suffix of the row labels')
  parser.add_argument('--dump_dir', default='',
                      help='also write each stage\'s HLO text here')
  parser.add_argument('--emit_xla', default='',
                      help='also write the replay bundle here (prepare.py)')
  parser.add_argument('--out', default='', help='JSON of the full census')
  parser.add_argument('--replay_tool', default='../shared/tools/xla-replay',
                      help='folder of the xla-replay prepare.py')
  parser.add_argument('--files', nargs='*', default=None,
                      help='census these HLO text files instead of building '
                      'steps (e.g. an XLA_FLAGS=--xla_dump_to dump, any '
                      'backend)')
  args = parser.parse_args(argv)
  if args.files is not None:
    rows = []
    for path in args.files:
      try:
        with open(path) as f:
          c = census(f.read())
      except (OSError, ValueError) as e:
        raise SystemExit(f'{path}: {e}') from None
      rows.append((os.path.basename(path), summary_row(c)))
    print(table(rows))
    return 0
  if args.emit_xla and not os.path.isfile(
      os.path.join(args.replay_tool, 'prepare.py')):
    raise SystemExit(f'--replay_tool: no prepare.py in {args.replay_tool}')
  stages = args.stages.split(',')
  bad = set(stages) - {'hlo', 'optimized_hlo'}
  if bad:
    raise SystemExit(f'--stages: unknown stage(s) {sorted(bad)}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  results, rows = {}, {s: [] for s in stages}
  for name, (step, features, labels, examples) in build(args).items():
    label = name + (f' {args.label}' if args.label else '')
    results[label] = {'examples': examples}
    for stage in stages:
      start = time.time()
      text = step._step.experimental_get_compiler_ir(  # pylint: disable=protected-access
          features, labels)(stage=stage)
      if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
        path = os.path.join(args.dump_dir,
                            f'{label.replace(" ", "_")}.{stage}.txt')
        with open(path + '.tmp', 'w') as f:
          f.write(text)
        os.replace(path + '.tmp', path)
      c = census(text)
      c['seconds'] = round(time.time() - start, 1)
      results[label][stage] = c
      rows[stage].append((label, summary_row(c)))
      print(f'{label} {stage}: {c["kernels"]} kernels ({c["seconds"]} s)',
            file=sys.stderr, flush=True)
    if args.emit_xla:
      sys.path.insert(0, args.replay_tool)
      import prepare  # pylint: disable=g-import-not-at-top
      from mtssl.benchmarking import accounting  # pylint: disable=g-import-not-at-top
      macs = accounting.forward_macs(step.model, name, features)
      # Training FLOPs: 6 x forward MACs (the step benchmark's convention).
      prepare.emit(step._step, (features, labels), args.emit_xla,  # pylint: disable=protected-access
                   f'{label.replace(" ", "_")}_{args.precision}_b{examples}',
                   meta={'examples_per_step': examples,
                         'train_flops_per_example':
                             6e9 * macs['forward_gmacs']})
  meta = {'tensorflow': tf.__version__, 'preset': args.preset,
          'precision': args.precision, 'options': guard_options(args)}
  for stage in stages:
    print(f'\n{stage} ({"before XLA optimizations: instructions" if stage == "hlo" else "CPU backend, optimized: kernels"}):')
    print(table(rows[stage]))
  if args.out:
    with open(args.out + '.tmp', 'w') as f:
      json.dump({'meta': meta, 'steps': results}, f, indent=1)
    os.replace(args.out + '.tmp', args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
