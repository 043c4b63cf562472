# Typed configuration of the samplers (Hydra structured config, group `sampling`).
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplerConfig:
    """Knobs of the registered samplers (``SAMPLERS``: flow_t2i, ddpm_t2i, text, ar_t2i, ar_text,
    mar_t2i), passed in ``SampleContext.cfg``.

    Args:
        steps: Euler steps of the flow ODE from t = 1 (noise) to t = 0 (data); for maskgit_t2i
            the parallel decoding iterations (each fixes some of the span's codes); for mar_t2i
            the iterations of MAR's order (at most one per position), each one trunk forward.
        guidance: classifier-free guidance scale; 1.0 disables the unconditional branch.
        time_shift: SD3-style shift of the time grid, ``t' = s t / (1 + (s - 1) t)``; s > 1
            spends more steps at high noise, which larger images need.
        prediction: what the network outputs ("v", "x", "eps"); must equal the objective's.
        t_eps: divisor floor of the prediction -> velocity conversion (as in the objective).
        max_caption_len: greedy decoding stops after this many bytes without EOS.
        use_cache: caption decoding runs the image prompt once and then one token per step
            with a KV cache; False re-runs the whole sequence every step (the reference
            path: the same captions up to float rounding, slower).
        seed: seeds the initial noise, so samples are reproducible across calls.
        schedule, num_timesteps: the DDPM noise schedule and T the model trained with (the
            objective's, objective transfusion_ddpm; sampler ddpm_t2i).
        ddim_eta: ddpm_t2i's noise per step: 0 deterministic DDIM, 1 ancestral DDPM.
        temperature: ar_t2i (discrete-token AR): softmax temperature of the guided code logits;
            0 = greedy (argmax). mar_t2i: scale of the per-token ODE's initial noise (1 = as
            trained).
        mar_steps: mar_t2i: Euler steps of each token's flow ODE through the "mar" head.
        top_k: ar_t2i: sample among the k most likely codes (0 = all).
        top_p: ar_t2i: nucleus sampling, the smallest set of codes whose probability reaches
            top_p (1.0 = all). temperature, top_k and top_p apply to maskgit_t2i's draws too.
        mask_temperature: maskgit_t2i: scale of the Gumbel noise added to the log-confidence
            that picks which codes to keep, annealed linearly to 0 over the steps (MaskGIT's
            ``choice_temperature``, 4.5 there); 0 keeps the most probable codes.
    """

    steps: int = 20
    guidance: float = 3.0
    time_shift: float = 1.0
    prediction: str = "v"
    t_eps: float = 0.05
    max_caption_len: int = 64
    use_cache: bool = True
    seed: int = 0
    schedule: str = "cosine"
    num_timesteps: int = 1000
    ddim_eta: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mask_temperature: float = 4.5
    mar_steps: int = 20

    def validate(self) -> "SamplerConfig":
        if self.steps <= 0 or self.max_caption_len <= 0 or self.mar_steps <= 0:
            raise ValueError("sampling.steps, sampling.mar_steps and sampling.max_caption_len must be positive")
        if self.time_shift <= 0:
            raise ValueError(f"sampling.time_shift must be positive, got {self.time_shift}")
        if self.prediction not in ("v", "x", "eps"):
            raise ValueError(f"sampling.prediction='{self.prediction}' not in ('v', 'x', 'eps')")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.temperature ({self.temperature}) and top_k ({self.top_k}) must be "
                             f">= 0 and top_p ({self.top_p}) in (0, 1]")
        if self.mask_temperature < 0:
            raise ValueError(f"sampling.mask_temperature must be >= 0, got {self.mask_temperature}")
        if self.ddim_eta < 0:
            raise ValueError(f"sampling.ddim_eta must be >= 0, got {self.ddim_eta}")
        return self
