"""Data of subject-driven generation: the subject's images for training, and the
validation prompts (token prompts for subject and prompt fidelity, ordinary shapes
captions for what the model forgot).

    python train.py experiment=dreambooth data.subject=badge_circle          # shapes world
    python train.py experiment=dreambooth model=sd15 data=dreambooth_folder \\
        data.root=~/dreambooth/dataset data.subject=dog data.class_word=dog   # real photos
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from orthodiff.data.datamodule import DataModule
from orthodiff.data.datasets import collate
from orthodiff.data.shapes import REFERENCE_SIZE, SPLIT_SEEDS, make_scene
from orthodiff.data.subjects import EVAL_PROMPTS, SUBJECTS, SubjectDataset, expected_labels, write_subject
from orthodiff.data.subjects.composites import CompositeSubjectDataset

# DreamBooth's own object prompts (a selection), for real subjects.
REAL_PROMPTS = ["a {token} {cls} in the jungle", "a {token} {cls} in the snow", "a {token} {cls} on the beach",
                "a {token} {cls} on a cobblestone street", "a {token} {cls} on top of pink fabric",
                "a {token} {cls} with a city in the background", "a red {token} {cls}", "a purple {token} {cls}"]


class SubjectPrompts(Dataset):
    """Validation prompts: each token prompt `samples` times (the diversity of a prompt
    needs several samples), then `no_token` ordinary shapes-world test captions. Items
    {"text", "index"}; `specs[index]` is what a faithful image shows (expected_labels of
    the EVAL_PROMPTS entry on the shapes world, {} for a real subject's prompt) or None
    for a no-token prompt."""

    def __init__(self, templates: list[str], token: str, class_word: str, subject: str | None,
                 samples: int = 4, no_token: int = 32):
        self.samples = samples
        self.texts, self.specs = [], []
        for entry in templates:
            template = entry["prompt"] if isinstance(entry, dict) else entry
            spec = expected_labels(subject, entry) if isinstance(entry, dict) else {}
            self.texts += [template.format(token=token, cls=class_word)] * samples
            self.specs += [spec] * samples
        for k in range(no_token):
            self.texts.append(make_scene(SPLIT_SEEDS["test"] + k).caption)
            self.specs.append(None)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index], "index": index}


class SubjectDataModule(DataModule):
    """One subject in the DreamBooth layout under `root`. A shapes-world subject
    (orthodiff.data.subjects.SUBJECTS) missing from `root` is written there first."""

    def __init__(self, root: str, subject: str, token: str = "sks", class_word: str | None = None,
                 num_images: int = 4, resolution: int = REFERENCE_SIZE, repeats: int = 100, batch_size: int = 4,
                 val_batch_size: int = 16, samples_per_prompt: int = 4, no_token_prompts: int = 32,
                 prompts: list | None = None, num_workers: int = 0, seed: int = 0, max_skip_fraction: float = 0.01):
        super().__init__(seed, max_skip_fraction)
        root = Path(root).expanduser()
        if subject in SUBJECTS and not (root / subject).is_dir():
            write_subject(root, subject, n=num_images)
        self.train_set = SubjectDataset(root, subject, token=token, class_word=class_word, size=resolution,
                                        repeats=repeats)
        self.class_word = self.train_set.class_word
        shapes_subject = subject in SUBJECTS
        templates = list(prompts) if prompts else (EVAL_PROMPTS if shapes_subject else REAL_PROMPTS)
        self.val_set = SubjectPrompts(templates, token, self.class_word, subject if shapes_subject else None,
                                      samples_per_prompt, no_token_prompts if shapes_subject else 0)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.val_batch_size, shuffle=False, collate_fn=collate)


class SubjectWorldDataModule(DataModule):
    """Many composite subjects (data/subjects/composites.py, never an evaluation subject),
    each seen on two backgrounds: what a subject encoder trains on (experiment=subject_encoder).
    Training and validation subjects come from disjoint seed ranges."""

    def __init__(self, token: str = "sks", resolution: int = REFERENCE_SIZE, num_train: int = 100_000,
                 num_val: int = 32, batch_size: int = 8, val_batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, max_skip_fraction: float = 0.01):
        super().__init__(seed, max_skip_fraction)
        self.train_set = CompositeSubjectDataset(SPLIT_SEEDS["train"], num_train, token, resolution)
        self.val_set = CompositeSubjectDataset(SPLIT_SEEDS["val"], num_val, token, resolution)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.val_batch_size, shuffle=False, collate_fn=collate)
