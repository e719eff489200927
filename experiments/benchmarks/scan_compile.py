"""Compile time and program size against depth, layers scanned (`model.scan_layers`) or
unrolled, for this machine's CPU and for a TPU target through avmae.aot:

    python experiments/benchmarks/scan_compile.py [--depths=12,24,48] [--targets=local,v5e-4]
        [--size=base] [--batch=16]

Depth is `model.modality_specific_depth` (each of the audio and video encoders; the decoder
keeps the size's depth); the parameters are sharded over every device (FSDP) so that 48 blocks
fit a v5e-4. Each row compiles the trainer's own step (`aot.compile_step`) and
prints compile seconds, the lowered StableHLO and compiled HLO sizes in characters, and the
unrolled / scanned ratios side by side.
"""

from __future__ import annotations

from absl import app, flags

from avmae import aot
from configs import cav_mae

_DEPTHS = flags.DEFINE_list("depths", ["12", "24", "48"], "Encoder depths.")
_TARGETS = flags.DEFINE_list("targets", ["local", "v5e-4"], "'local' or TPU names.")
_SIZE = flags.DEFINE_string("size", "base", "configs/cav_mae.py size (width, heads, decoder).")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch.")


def measure(target: str, depth: int, scan: bool) -> dict:
  config = cav_mae.override(cav_mae.get_config(_SIZE.value), {
      "model.modality_specific_depth": depth, "model.scan_layers": scan,
      "data.batch_size": _BATCH.value, "mesh.data": 1, "mesh.fsdp": -1})  # 48 blocks fit
  r = aot.compile_step(config, target, 1, train_examples=36_900 * 48)
  return {"compile_s": r.compile_seconds, "lowered_chars": len(r.lowered.as_text()),
          "hlo_chars": len(r.compiled.as_text())}


def main(argv) -> None:
  del argv
  print(f"{_SIZE.value} width, encoder depth varied, global batch {_BATCH.value}")
  print("| target | depth | unrolled compile (s) | scanned compile (s) | ratio | unrolled HLO "
        "(M chars) | scanned HLO (M chars) | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for target in _TARGETS.value:
    for depth in map(int, _DEPTHS.value):
      u, s = measure(target, depth, False), measure(target, depth, True)
      print(f"| {target} | {depth} | {u['compile_s']:.1f} | {s['compile_s']:.1f} | "
            f"{u['compile_s'] / s['compile_s']:.1f}x | {u['hlo_chars'] / 1e6:.2f} | "
            f"{s['hlo_chars'] / 1e6:.2f} | {u['hlo_chars'] / s['hlo_chars']:.1f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
