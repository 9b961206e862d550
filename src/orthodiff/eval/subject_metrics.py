"""Scores of subject-driven generation (DreamBooth's protocol, in the shapes world by default).

    scorer = SubjectScorer(subject_images, evaluator="shapes")    # or "dino" / "clip" with models
    scorer.update(images, prompts, specs)     # specs: EVAL_PROMPTS entries, None for no-token prompts
    scorer.compute()

- subject_fidelity: mean cosine similarity between the features of every generated
  token-prompt image and every subject image (DINO / CLIP-I on real subjects). On the
  shapes world the features are the classifier oracle's FID features, centred on the
  mean of ordinary shapes-world scenes: uncentred, any two scenes share the large
  "mostly background" component and every cosine is near 1.
- prompt_fidelity: on the shapes world, the share of what each prompt asks that the
  classifier finds (background, a recolouring's colour present and the old one gone,
  the extra shape); CLIP-T (CLIPScore / 100) with a CLIP model. The number of subject
  copies is not scored: a two-coloured subject cannot be counted by colours.
- diversity: mean pairwise (1 - cosine) between samples of the same prompt.
- no-token prompts (forgetting): the classifier's prompted kind / colour recognition of
  ordinary shapes captions, as in eval.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SPLIT_SEEDS, make_scene
from orthodiff.eval.image_metrics import clip_score, pooled_embedding, prompt_alignment, unit_images
from orthodiff.eval.oracles import PAIRS, images_to_tensor, load_oracle

EVALUATORS = ("shapes", "dino", "clip")
CENTRE_SCENES = 64  # ordinary test scenes whose mean feature centres the shapes features


class SubjectScorer:
    def __init__(self, subject_images, evaluator: str = "shapes", dino_model: str | None = None,
                 clip_model: str | None = None, classifier=None):
        if evaluator not in EVALUATORS:
            raise ValueError(f"unknown subject evaluator {evaluator!r}; choose from {EVALUATORS}")
        if evaluator == "dino" and not dino_model:
            raise ValueError("evaluator=dino needs dino_model= (a local folder or cached hub id, "
                             "e.g. facebook/dino-vits16)")
        if evaluator == "clip" and not clip_model:
            raise ValueError("evaluator=clip needs clip_model= (a local folder or cached hub id, "
                             "e.g. openai/clip-vit-large-patch14)")
        self.evaluator, self.clip_model = evaluator, clip_model
        if evaluator == "shapes":
            self.classifier = classifier or load_oracle("classifier")
            centre = images_to_tensor(np.stack([make_scene(SPLIT_SEEDS["test"] + k).image
                                                for k in range(CENTRE_SCENES)]))
            self.centre = self.classifier.features(centre).mean(0)
            self.features = lambda images: self.classifier.features(images) - self.centre
        elif evaluator == "dino":
            self.features = _hf_image_features(dino_model, "dino")
        else:
            self.features = _hf_image_features(clip_model, "clip")
        self.subject = F.normalize(self.features(unit_images(_as_tensor(subject_images))), dim=1)
        self.reset()

    def reset(self):
        self.images, self.prompts, self.specs = [], [], []

    def update(self, images: torch.Tensor, prompts: list[str], specs: list[dict | None]) -> None:
        """images (N, 3, H, W) in [0, 1]; specs[i] is what prompt i asks (expected_labels of
        its EVAL_PROMPTS entry; {} for a prompt without them), None for a no-token prompt."""
        if not len(images) == len(prompts) == len(specs):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(specs)} specs")
        self.images.append(unit_images(images).cpu())
        self.prompts += list(prompts)
        self.specs += list(specs)

    def compute(self) -> dict[str, float]:
        images = torch.cat(self.images)
        token = [i for i, spec in enumerate(self.specs) if spec is not None]
        plain = [i for i, spec in enumerate(self.specs) if spec is None]
        scores = {}
        if token:
            features = F.normalize(self.features(images[token]), dim=1)
            scores["subject_fidelity"] = float((features @ self.subject.T).mean())
            prompts = [self.prompts[i] for i in token]
            scores["diversity"] = _diversity(features, prompts)
            if self.evaluator == "shapes" and all(self.specs[i] for i in token):  # shapes-world prompts
                scores.update(self._prompt_checks(images[token], [self.specs[i] for i in token]))
            elif self.clip_model:
                scores["prompt_fidelity"] = clip_score(images[token], prompts, self.clip_model)["clip_score"] / 100
        if plain and self.evaluator == "shapes":
            found = prompt_alignment(images[plain], [self.prompts[i] for i in plain], self.classifier)
            scores["no_token_kind"] = found["prompted_kinds_recognized"]
            scores["no_token_color"] = found["prompted_colors_recognized"]
        return scores

    def _prompt_checks(self, images: torch.Tensor, specs: list[dict]) -> dict[str, float]:
        pred = self.classifier.predict(images)
        background_names, color_names = list(BACKGROUNDS), list(COLORS)
        shares, backgrounds = [], []
        for k, spec in enumerate(specs):
            checks = [background_names[pred["background"][k]] == spec["background"]]
            backgrounds.append(checks[0])
            checks += [bool(pred["colors"][k][color_names.index(c)]) for c in spec["colors_present"]]
            checks += [not pred["colors"][k][color_names.index(c)] for c in spec["colors_absent"]]
            checks += [bool(pred["pairs"][k][PAIRS.index(tuple(p))]) for p in spec["pairs_present"]]
            shares.append(np.mean(checks))
        return {"prompt_fidelity": float(np.mean(shares)), "background_accuracy": float(np.mean(backgrounds))}


def _diversity(features: torch.Tensor, prompts: list[str]) -> float:
    distances = []
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        distances += [1 - float(features[a] @ features[b]) for a, b in itertools.combinations(rows, 2)]
    return float(np.mean(distances)) if distances else float("nan")


def _as_tensor(images) -> torch.Tensor:
    return images if torch.is_tensor(images) else images_to_tensor(np.stack(images))


def _hf_image_features(model_name_or_path: str, kind: str):
    """Image embeddings of a transformers model: DINO's CLS token, CLIP's projected image
    embedding. Loaded from a local folder or a cached hub id; the error says so."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel

    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        model = (CLIPModel if kind == "clip" else AutoModel).from_pretrained(model_name_or_path).eval()
    except OSError as error:
        raise FileNotFoundError(f"{kind} model {model_name_or_path!r} could not be loaded ({error}); pass a "
                                "local folder (save_pretrained) or a hub id cached by a run with network "
                                "access") from None

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        pixels = (images * 255).round().to(torch.uint8)
        inputs = processor(images=list(pixels), return_tensors="pt")
        if kind == "clip":
            return pooled_embedding(model.get_image_features(pixel_values=inputs["pixel_values"]))
        return model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]

    return features
