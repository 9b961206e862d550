"""Metrics and evaluators, imported by the tasks and the tables, importing no task:
control consistency (control_metrics.py: Canny IoU/F1, seg mIoU, depth RMSE, landmark
error, and each control's headline metric), the shapes-world evaluator networks
(oracles.py), the plain metric functions (metrics.py), image quality (image_metrics.py:
FID/KID, CLIP score, prompt alignment) and subject-driven scores (subject_metrics.py).
SD 1.5 parameter counts live with their table, in reproduce/params.py."""
