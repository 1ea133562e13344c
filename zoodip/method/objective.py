"""The training objective L_LDM (paper Eq. 1) as a function of the pseudo-token theta.

theta is one flat fp32 vector: the placeholder rows of every text encoder (SDXL trains both), concatenated.
The base embedding tables are never written: a thin wrapper substitutes theta's rows wherever a placeholder
id appears, one theta per batch element, so several perturbed tokens run in one batched forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zoodip.errors import ZoodipError
from zoodip.models.embeddings import load_init_embedding
from zoodip.models.loading import Components

#: torch.compile modes for the training forwards (`train.compile`); on a GPU, reduce-overhead and
#: max-autotune also capture CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(mode: str | bool | None, quantization: str, key: str = "train.compile") -> None:
    """`mode` is off (false/null) or a torch.compile mode, and the weights can be compiled."""
    if mode is None or mode is False:
        return
    if mode not in COMPILE_MODES:
        raise ZoodipError(f"{key} must be false or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if quantization == "int4":  # quanto's INT4 layers report the wrong dtype to dynamo's fake tensors
        raise ZoodipError(f"{key}={mode} needs INT8 or unquantized weights: quanto's INT4 layers do not compile")


class PlaceholderEmbedding(torch.nn.Module):
    """Token embedding whose placeholder rows come from `values` (B, k, d) instead of the table."""

    def __init__(self, base: torch.nn.Embedding, placeholder_ids: list[int], init_rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.placeholder_ids = list(placeholder_ids)
        self.register_buffer("init_rows", init_rows.detach().clone(), persistent=False)
        self.values: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        values = self.init_rows[None] if self.values is None else self.values
        for j, token_id in enumerate(self.placeholder_ids):
            mask = (input_ids == token_id)[..., None]
            out = torch.where(mask, values[:, j, None, :].to(out.dtype), out)
        return out


def _embeddings_module(encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP module that owns `token_embedding` (transformers 4 nests it under `text_model`, 5 does not)."""
    for module in encoder.modules():
        if hasattr(module, "token_embedding") and hasattr(module, "position_embedding"):
            return module
    raise ZoodipError(f"{type(encoder).__name__} has no CLIP token embedding to attach the placeholder to")


#: Words offered when an initializer is not one token, each only where it is one (CLIP's, the toy world's).
COMMON_WORDS = ("dog", "toy", "object", "thing", "shape", "cat", "person")


def single_token_words(
    tokenizers: Sequence, candidates: Sequence[str | None], exclude: str = "", limit: int = 3
) -> list[str]:
    """Up to `limit` of `candidates` (in order, no repeats, not `exclude`) that are one token of every tokenizer;
    where too few are, whole words of the first tokenizer's vocabulary fill in."""

    def one_token(word: str) -> bool:
        return all(len(t(word, add_special_tokens=False).input_ids) == 1 for t in tokenizers)

    words: list[str] = []
    for word in candidates:
        if word and word != exclude and word not in words and one_token(word):
            words.append(word)
    if len(words) < limit and tokenizers:
        vocab = sorted(tokenizers[0].get_vocab().items(), key=lambda item: item[1])
        for token, _ in vocab:
            word = token.removesuffix("</w>")
            if len(words) >= limit:
                break
            if (
                token.endswith("</w>")
                and len(word) >= 4
                and word.isalpha()
                and word.isascii()
                and word != exclude
                and word not in words
                and one_token(word)
            ):
                words.append(word)
    return words[:limit]


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector naming: <p>, <p>_1, ..., as load_textual_inversion expands a (k, d) tensor."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


class TextConditioner:
    """Adds the placeholder token(s) to every tokenizer and turns (prompt, theta batch) into UNet conditioning."""

    def __init__(
        self,
        parts: Components,
        placeholder: str,
        initializer: str,
        num_vectors: int,
        source: str = "data.initializer_token",
        suggest: Sequence[str | None] = (),
    ) -> None:
        """`source`: the key that chose `initializer`, for the error when it is not one token; `suggest`: words to
        offer first there (e.g. the model's own initializer), each only if it is one token of every tokenizer."""
        if num_vectors < 1:
            raise ZoodipError(f"data.num_vectors must be at least 1, got {num_vectors}")
        self.parts = parts
        self.placeholder = placeholder
        self.tokens = placeholder_tokens(placeholder, num_vectors)
        self.embeddings: list[PlaceholderEmbedding] = []
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True):
            init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
            if len(init_ids) != 1:
                words = single_token_words(parts.tokenizers, [*suggest, *COMMON_WORDS], exclude=initializer)
                offer = " or ".join(f"data.initializer_token={w}" for w in words) or "another word"
                raise ZoodipError(
                    f"{source}={initializer!r} is {len(init_ids)} tokens for this model's tokenizer; the initializer "
                    f"must be exactly one: try {offer}"
                )
            known = tokenizer(placeholder, add_special_tokens=False).input_ids
            if len(known) == 1 or tokenizer.add_tokens(self.tokens) != num_vectors:
                raise ZoodipError(
                    f"data.placeholder_token={placeholder!r} is already in the tokenizer's vocabulary; "
                    "choose a new string such as '<my-subject>'"
                )
            table = encoder.get_input_embeddings()
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            init_rows = table.weight[init_ids[0]].detach()[None].repeat(num_vectors, 1)
            wrapper = PlaceholderEmbedding(table, ids, init_rows)
            _embeddings_module(encoder).token_embedding = wrapper
            self.embeddings.append(wrapper)
        self.widths = [e.init_rows.shape[1] for e in self.embeddings]
        self.num_vectors = num_vectors

    @property
    def dim(self) -> int:
        return self.num_vectors * sum(self.widths)

    def initial_theta(self, init_embedding: str | None = None, allow_pickle: bool = False) -> torch.Tensor:
        """theta_0: the initializer token's embedding in every placeholder row, as one fp32 vector; with
        `init_embedding` (data.init_embedding, a diffusers or A1111 file), that file's rows instead."""
        if init_embedding:
            self.use_rows(load_init_embedding(init_embedding, self.widths, allow_pickle))
        return torch.cat([e.init_rows.float().cpu().flatten() for e in self.embeddings])

    def use_rows(self, rows: list[torch.Tensor]) -> None:
        """Start from these (k, d) rows per text encoder instead of the initializer word's."""
        if any(r.shape[0] != self.num_vectors for r in rows):
            raise ZoodipError(
                f"data.init_embedding holds {rows[0].shape[0]} vector(s) per token but data.num_vectors="
                f"{self.num_vectors}; set data.num_vectors={rows[0].shape[0]}"
            )
        for emb, r in zip(self.embeddings, rows, strict=True):
            emb.init_rows = r.to(emb.init_rows.device, emb.init_rows.dtype)

    def split(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """(..., D) -> per encoder (..., k, d_enc)."""
        sizes = [self.num_vectors * w for w in self.widths]
        parts = torch.split(theta, sizes, dim=-1)
        return [p.reshape(*theta.shape[:-1], self.num_vectors, w) for p, w in zip(parts, self.widths, strict=True)]

    def expand(self, prompt: str) -> str:
        """'a photo of <p>' -> 'a photo of <p> <p>_1 ...' for multi-vector tokens."""
        return prompt.replace(self.placeholder, " ".join(self.tokens)) if self.num_vectors > 1 else prompt

    def token_ids(self, prompt: str) -> list[torch.Tensor]:
        """Token ids (1, 77) of `prompt` (with '{}' filled by the placeholder) for each tokenizer."""
        text = self.expand(prompt.format(self.placeholder) if "{}" in prompt else prompt)
        return [
            tok(
                text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.parts.device)
            for tok in self.parts.tokenizers
        ]

    def encode(self, ids: list[torch.Tensor], thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UNet conditioning for a batch of tokens `thetas` (m, D): (prompt embeds, pooled embeds or None).

        SD1.x/2.x: the last hidden state. SDXL (as diffusers' pipeline): both encoders' penultimate hidden
        states side by side, and the second encoder's projected pooled output.
        """
        m = thetas.shape[0]
        dtype = self.parts.dtype
        for emb, rows in zip(self.embeddings, self.split(thetas.to(self.parts.device)), strict=True):
            emb.values = rows.to(dtype)
        try:
            if not self.parts.is_sdxl:
                return self.parts.text_encoders[0](ids[0].expand(m, -1))[0], None
            hidden, pooled = [], None
            for encoder, input_ids in zip(self.parts.text_encoders, ids, strict=True):
                out = encoder(input_ids.expand(m, -1), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
            return torch.cat(hidden, dim=-1), pooled
        finally:
            for emb in self.embeddings:
                emb.values = None


class Objective:
    """L_LDM at one training step's shared sample (common random numbers): every call to `losses` sees the
    same latent z, noise, timestep and prompt, so differences between losses come from theta alone."""

    def __init__(
        self,
        parts: Components,
        text: TextConditioner,
        batched: bool = False,
        max_batch: int = 8,
        compile_mode: str | None = None,
    ) -> None:
        self.parts, self.text = parts, text
        self.batched, self.max_batch = batched, max(1, int(max_batch))
        self.forward_passes = 0
        # Only these forwards are compiled (`train.compile`); validation samples with the eager UNet.
        self.compiled = bool(compile_mode)
        self.unet = parts.unet
        if compile_mode:
            # Harmless for this UNet, printed at every compile: diffusers' lru_cached version check, and
            # quanto's weight tensors lacking a hash for AOT autograd's cache.
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")
            self.unet = torch.compile(parts.unet, mode=compile_mode)

    def set_sample(
        self, z0: torch.Tensor, noise: torch.Tensor, t: int, prompt: str, target: torch.Tensor | None = None
    ):
        """Fix this step's sample: z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (Eq. 1/9) and its regression target."""
        device, dtype = self.parts.device, self.parts.dtype
        scheduler = self.parts.scheduler
        t_host = torch.tensor([t])  # the scheduler's index: from the host, never read back from the device (a sync)
        self.t = t_host.to(device)
        z0, noise = z0.to(device), noise.to(device)
        self.z_t = scheduler.add_noise(z0, noise, t_host).to(dtype)
        if target is not None:
            self.target = target.to(device).float()
        elif scheduler.config.prediction_type == "v_prediction":  # SD2.1 768-v regresses the velocity
            self.target = scheduler.get_velocity(z0, noise, t_host).float()
        else:
            self.target = noise.float()
        self.ids = self.text.token_ids(prompt)

    def predict(self, thetas: torch.Tensor) -> torch.Tensor:
        """eps_phi(z_t, t, c(y*)) for each token in the batch: one text-encoder pass and one UNet pass."""
        m = thetas.shape[0]
        cond, pooled = self.text.encode(self.ids, thetas)
        kwargs = {}
        if pooled is not None:
            size = self.z_t.shape[-1] * 8
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.parts.device, dtype=cond.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(m, -1)}
        self.forward_passes += m
        pred = self.unet(self.z_t.expand(m, -1, -1, -1), self.t.expand(m), cond, **kwargs).sample
        # A CUDA graph (train.compile=reduce-overhead) overwrites its output at the next replay: hand out a copy.
        return pred.clone() if self.compiled else pred

    def losses(self, thetas: torch.Tensor) -> torch.Tensor:
        """||eps - eps_phi(z_t, t, c(theta_i))||^2 (mean over elements) for each row of `thetas` (m, D)."""
        thetas = thetas.to(self.parts.device)  # one host-to-device copy (a stream sync) per step, not one per chunk
        chunks = thetas.split(self.max_batch) if self.batched else thetas.split(1)
        out = []
        for chunk in chunks:
            pred = self.predict(chunk).float()
            target = self.target.expand_as(pred)
            out.append(F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(out)
