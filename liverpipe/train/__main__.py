"""``python -m liverpipe.train`` (or ``torchrun ... -m liverpipe.train``): one training job."""

from liverpipe.train.loop import main

main()
