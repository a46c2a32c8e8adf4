"""What each backend changes in a real pretrained model on real text (`effattn fidelity`)."""
