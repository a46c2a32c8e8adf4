"""What each backend gives up: accuracy of small models trained on tasks generated here
(`effattn quality`)."""
