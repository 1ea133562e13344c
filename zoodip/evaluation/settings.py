"""What an evaluation reads of a run's config, typed once by `zoodip.schema.eval_settings`: the `eval` group, the
subject (the `data` group) and the model to generate with."""

from __future__ import annotations

from dataclasses import dataclass

from zoodip.data.dataset import DataSettings
from zoodip.models.loading import ModelSettings


@dataclass(frozen=True)
class GenerationSettings:
    """How each image is drawn: image j of a prompt from its own CPU generator seeded `seed + j`."""

    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 8
    scheduler: str | None = None  # a diffusers scheduler class; None: the model folder's own, else DDIM


@dataclass(frozen=True)
class ClipSettings:
    """The S1.2 CLIP backbone: a transformers hub id or folder, or open_clip's model and pretrained tag."""

    path: str = "openai/clip-vit-base-patch32"
    backend: str = "transformers"  # transformers | open_clip
    open_clip_model: str | None = None
    open_clip_pretrained: str | None = None


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation of one run (eval/dreambooth.yaml, eval/toyworld.yaml document each knob)."""

    kind: str  # dreambooth (CLIP / DINO, S1.2) | toyworld (the world's scorer)
    data: DataSettings  # the subject: its name, reference images, placeholder and initializer word
    model: ModelSettings  # the run's model, quantized as in training
    other_model: str | None  # eval.model: generate with this hub id or folder instead, unquantized
    generation: GenerationSettings
    images_per_prompt: int
    diversity_images: int  # DINO_inter's images of the first prompt (S3.3)
    use_class_token: bool
    living: bool | None  # which prompt table; None: from the subject table
    class_noun: str | None
    clip: ClipSettings
    dino: str  # the DINOv2 hub id or folder
    scorer: str | None  # eval=toyworld: the world's scorer
    device: str  # eval.device, else train.device
    device_key: str  # which of the two, for errors
    validation_prompts: int  # eval.every's cheap validation
    validation_images_per_prompt: int
    progress: bool  # train.progress: a progress bar over the images

    @property
    def generation_model(self) -> ModelSettings:
        """The model the images are drawn with: the run's own, or `eval.model` unquantized."""
        if self.other_model is None:
            return self.model
        return ModelSettings(
            self.model.arch, "pretrained", self.other_model, self.model.dtype, self.model.seed, self.model.resolution
        )
