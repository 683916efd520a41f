"""Trainer stage: pretrain, fine-tune and evaluate a U-Net on the Zarr store."""
