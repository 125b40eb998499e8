"""What a job leaves on disk and reads back: checkpoints, the run folder, a trained model, the settings files,
the W&B run."""
