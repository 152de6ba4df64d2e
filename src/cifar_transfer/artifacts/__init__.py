"""What a run leaves on disk: checkpoints, the run dir's files, the model bundle."""
