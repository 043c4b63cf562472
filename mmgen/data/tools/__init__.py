# Offline data tools (check, index, stats, preview, recipes): not on the training path.
