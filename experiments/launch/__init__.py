"""Launchers: TPU VMs (tpu_vm), GKE through xpk (xpk), SLURM (slurm) and local processes
(local), all building the trainer's command with common."""
