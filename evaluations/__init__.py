"""
Sample-quality metrics of the paper (FID, sFID, Inception Score, precision, recall) in PyTorch.

- evaluator.py: `python evaluations/evaluator.py REF.npz SAMPLE.npz`, and the metric functions.
- inception.py: FIDInceptionV3, the 2015 TF Inception graph as ported by pytorch-fid.
- npz_io.py: streaming reads of .npz batches and shard folders, atomic writes, image folders.
- make_reference_batch.py, png_to_npz.py, npz_to_png.py: command-line tools.
"""
