# Synthetic generators of the embedded data (captioned shapes: images, videos, documents).
