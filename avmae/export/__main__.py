"""`python -m avmae.export --workdir=DIR [--step=N] [--format=F] --out=PATH`.

See avmae/export/to_torch.py for the formats and the metadata written beside each file.
"""

from absl import app, flags

from avmae.export import cav_mae_layout, to_torch


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (python -m avmae.train --workdir).",
                      required=True)
  flags.DEFINE_integer("step", None, "Saved step to export; default the latest.")
  flags.DEFINE_string("format", "", "Target layout, one of the method's (CAV-MAE: cav_mae, "
                      "timm); default its first.")
  flags.DEFINE_enum("variant", "pretrain", sorted(cav_mae_layout.VARIANTS),
                    "--format=cav_mae: which official model's layout.")
  flags.DEFINE_integer("num_classes", 527, "Outputs of the finetuning variants' mlp_head.")
  flags.DEFINE_bool("module_prefix", False, "Prefix keys with 'module.' (DataParallel, as the "
                    "released official checkpoints).")
  flags.DEFINE_string("wrap", "", "Nest the .pth state_dict under this key: 'model' for "
                      "Audio-MAE's official scripts (main_finetune_as.py --finetune reads "
                      "checkpoint['model']); default a plain state_dict (load_state_dict).")
  flags.DEFINE_string("out", None, "Output file, .safetensors or .pth.", required=True)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  to_torch.export(f.workdir, f.out, f.format, f.step, f.variant, f.num_classes, f.module_prefix,
                  wrap=f.wrap)


if __name__ == "__main__":
  define_flags()
  app.run(main)
