# Typed configuration of the training objectives (Hydra structured config, group `objective`).
from __future__ import annotations

from dataclasses import dataclass, field

PREDICTIONS = ("v", "x", "eps")
TIME_SAMPLINGS = ("uniform", "logit_normal")
SCHEDULES = ("cosine", "linear")    # DDPM noise schedules (objective transfusion_ddpm)
RECON_LOSSES = ("l1", "l2")
MASK_SCHEDULES = ("cosine", "linear")   # mask-ratio schedules (objective masked_vq)


@dataclass
class ObjectiveConfig:
    """Which objective, how its losses are weighted, and the flow-matching knobs.

    Flow convention: ``x_t = (1 - t) x0 + t noise`` (t = 0 clean, t = 1 noise), velocity
    ``v = noise - x0``; the loss is always the velocity MSE, whatever the network predicts.

    Args:
        weights: loss name -> weight in the total (names: "text", "visual").
        prediction: what the network outputs: "v" (velocity), "x" (clean patches; JiT, Li & He
            2025, find it much better for high-dimensional pixel patches) or "eps" (noise).
        time_sampling: "uniform" or "logit_normal" (SD3) for the target spans' t.
        t_eps: floor of the t (x-prediction) or 1 - t (eps-prediction) divisor when converting
            a prediction to a velocity.
        schedule: DDPM only (``name=transfusion_ddpm``): the noise schedule, "cosine" (Nichol &
            Dhariwal 2021) or "linear" (betas 1e-4 .. 0.02, Ho et al. 2020). There
            ``prediction`` means DDPM's targets: "eps" (noise), "v" (Salimans & Ho 2022:
            ``sqrt(abar) eps - sqrt(1 - abar) x0``) or "x" (clean latents), and the loss is the
            MSE of that target.
        num_timesteps: DDPM only: discrete diffusion steps T (timesteps 1..T, uniform).
        recon_loss: reconstruction loss of the codec objectives (vae, vq): "l1" or "l2".
        mask_schedule: masked discrete diffusion only (``name=masked_vq``): the mask ratio of a
            target span as a function of ``u ~ U(0, 1)``, "cosine" (MaskGIT / Show-o:
            ``cos(pi/2 u)``, mostly high ratios) or "linear" (``1 - u``, uniform ratios).
        mask_id: masked_vq only: the mask token's id in the shared vocabulary, the first id
            above the codes (text ids + codebook size); configs/objective/masked_vq.yaml
            resolves it from ``data.tokenizer`` and ``data.codec``, -1 = unset.
        mask_text: masked_vq only: also mask text (MMaDA); not implemented, refused when true.
        mar_draws: MAR only (``name=mar``): noise draws per masked position per step for the
            per-token denoiser (the trunk runs once, the head K times; MAR uses 4).
        mar_mask_min: MAR only: each target span masks a share ``r`` of its positions drawn
            from MAR's truncated normal (mean 1.0, std 0.25) on ``[mar_mask_min, 1]`` (MAR:
            0.7), at least one position.
    """

    name: str = "transfusion"
    weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "visual": 1.0})
    prediction: str = "v"
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_eps: float = 0.05
    schedule: str = "cosine"
    num_timesteps: int = 1000
    recon_loss: str = "l1"
    mask_schedule: str = "cosine"
    mask_id: int = -1
    mask_text: bool = False
    mar_draws: int = 4
    mar_mask_min: float = 0.7

    def validate(self) -> "ObjectiveConfig":
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction='{self.prediction}' not in {PREDICTIONS}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"objective.time_sampling='{self.time_sampling}' not in "
                             f"{TIME_SAMPLINGS}")
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std must be positive, got {self.logit_std}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"objective.schedule='{self.schedule}' not in {SCHEDULES}")
        if self.num_timesteps < 2:
            raise ValueError(f"objective.num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"objective.recon_loss='{self.recon_loss}' not in {RECON_LOSSES}")
        if self.mar_draws < 1:
            raise ValueError(f"objective.mar_draws must be >= 1, got {self.mar_draws}")
        if not 0 <= self.mar_mask_min <= 1:
            raise ValueError(f"objective.mar_mask_min must be in [0, 1], got {self.mar_mask_min}")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"objective.t_eps must be in (0, 1), got {self.t_eps}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"objective.mask_schedule='{self.mask_schedule}' not in {MASK_SCHEDULES}")
        if self.mask_text:
            raise ValueError("objective.mask_text=true (MMaDA-style masked text) is not implemented: "
                             "objective=masked_vq masks image codes only and keeps next-token text; "
                             "leave objective.mask_text=false")
        return self
