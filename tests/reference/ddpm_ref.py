"""Plain-PyTorch reference of the ddpm-train UNet and loss (Ho et al. 2020).

Written independently of the C++ code, from the authors' TensorFlow model
(diffusion_tf/models/unet.py). Module names match the C++ UNet so that a state dict moves
between them unchanged. It serves two purposes: the golden parity test (tests/golden_test.cc)
and the side-by-side performance peer (bench/).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Attn(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.einsum("bci,bcj->bij", q, k) * (c ** -0.5)
        weights = weights.softmax(dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups, attn):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.nin_shortcut = None
        self.attn = Attn(out_ch, groups) if attn else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        h = x + h
        if self.attn is not None:
            h = self.attn(h)
        return h


class Downsample(nn.Conv2d):
    def __init__(self, ch):
        super().__init__(ch, ch, 3, stride=2)

    def forward(self, x):
        # TensorFlow's SAME padding for stride 2 pads only bottom and right.
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Conv2d):
    def __init__(self, ch):
        super().__init__(ch, ch, 3, padding=1)

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, image_size=32, in_channels=3, norm_groups=32, learn_sigma=False,
                 num_classes=0):
        super().__init__()
        self.ch = ch
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        self.temb_dense0 = nn.Linear(ch, temb_ch)
        self.temb_dense1 = nn.Linear(temb_ch, temb_ch)
        # Class conditioning as guided-diffusion writes it (Dhariwal & Nichol 2021: the label's
        # embedding added to the timestep's), with one more row for "no class", the null label
        # of classifier-free guidance (Ho & Salimans 2022) that a dropped label becomes.
        self.num_classes = num_classes
        if num_classes > 0:
            self.class_embed = nn.Embedding(num_classes + 1, temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chs = [ch]
        cur_ch, res = ch, image_size
        levels = len(ch_mult)
        for level, mult in enumerate(ch_mult):
            for block in range(num_res_blocks):
                out_ch = ch * mult
                self.add_module(f"down_{level}_{block}",
                                ResBlock(cur_ch, out_ch, temb_ch, dropout, norm_groups,
                                         res in attn_resolutions))
                cur_ch = out_ch
                skip_chs.append(cur_ch)
            if level != levels - 1:
                self.add_module(f"down_{level}_ds", Downsample(cur_ch))
                skip_chs.append(cur_ch)
                res //= 2
        self.mid_block1 = ResBlock(cur_ch, cur_ch, temb_ch, dropout, norm_groups, True)
        self.mid_block2 = ResBlock(cur_ch, cur_ch, temb_ch, dropout, norm_groups, False)
        for level in reversed(range(levels)):
            for block in range(num_res_blocks + 1):
                out_ch = ch * ch_mult[level]
                self.add_module(f"up_{level}_{block}",
                                ResBlock(cur_ch + skip_chs.pop(), out_ch, temb_ch, dropout,
                                         norm_groups, res in attn_resolutions))
                cur_ch = out_ch
            if level != 0:
                self.add_module(f"up_{level}_us", Upsample(cur_ch))
                res *= 2
        self.norm_out = nn.GroupNorm(norm_groups, cur_ch, eps=1e-6)
        # Learned variances (Nichol & Dhariwal 2021): a second set of output channels.
        self.conv_out = nn.Conv2d(cur_ch, in_channels * (2 if learn_sigma else 1), 3, padding=1)

    def forward(self, x, t, y=None):
        """y: [B] int64 labels in [0, num_classes], num_classes meaning "no class"; None: no
        class for every sample."""
        temb = timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        if self.num_classes > 0:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
            temb = temb + self.class_embed(y).to(x.dtype)
        hs = [self.conv_in(x)]
        levels = len(self.ch_mult)
        for level in range(levels):
            for block in range(self.num_res_blocks):
                hs.append(getattr(self, f"down_{level}_{block}")(hs[-1], temb))
            if level != levels - 1:
                hs.append(getattr(self, f"down_{level}_ds")(hs[-1]))
        h = hs[-1]
        h = self.mid_block1(h, temb)
        h = self.mid_block2(h, temb)
        for level in reversed(range(levels)):
            for block in range(self.num_res_blocks + 1):
                h = getattr(self, f"up_{level}_{block}")(torch.cat([h, hs.pop()], dim=1), temb)
            if level != 0:
                h = getattr(self, f"up_{level}_us")(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def linear_alphas_cumprod(timesteps, beta_start, beta_end):
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def loss_eps_l2(model, x0, t, noise, alphas_cumprod):
    """L_simple of Ho et al. (Eq. 14): mean over the batch of ||eps - eps_theta(x_t, t)||^2."""
    abar = alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
    return ((model(x_t, t) - noise) ** 2).mean()



# The variational bound of Ho et al. (Eq. 5) and L_hybrid of Nichol & Dhariwal (2021), written
# from the papers' equations: KL terms for t > 0, the discretized decoder for t = 0.
class Schedule:
    def __init__(self, timesteps, beta_start=1e-4, beta_end=0.02):
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.abar = torch.cumprod(1.0 - self.betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        # Eq. 7 of Ho et al.: beta-tilde and the posterior mean's coefficients.
        self.beta_tilde = self.betas * (1.0 - abar_prev) / (1.0 - self.abar)
        self.log_beta_tilde = torch.log(torch.cat([self.beta_tilde[1:2], self.beta_tilde[1:]]))
        self.coef_x0 = self.betas * abar_prev.sqrt() / (1.0 - self.abar)
        self.coef_xt = (1.0 - abar_prev) * (1.0 - self.betas).sqrt() / (1.0 - self.abar)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(bin of x) under N(mean, e^(2 log_scale)): bins of width 2/255 over [-1, 1], the
    first and last open to -inf and +inf. In float64 with the exact normal CDF."""
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255) * inv
    lower = (x - mean - 1.0 / 255) * inv
    # Every probability floored at 1e-12, as in the authors' code.
    log_cdf_upper = torch.log(torch.special.ndtr(upper).clamp(min=1e-12))
    log_sf_lower = torch.log(torch.special.ndtr(-lower).clamp(min=1e-12))
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def vb_terms_bits(out, x0, x_t, t, sched, learn_sigma):
    """Each sample's L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
    -log p(x_0|x_1) for t = 0. The model predicts eps (and v, the variance interpolation)."""
    view = lambda a: a[t][:, None, None, None]  # noqa: E731
    if learn_sigma:
        eps, v = out.double().chunk(2, dim=1)
        # Eq. 15 of Nichol & Dhariwal, v mapped from the network's [-1, 1] to [0, 1].
        frac = (v + 1.0) / 2.0
        logvar_p = frac * view(torch.log(sched.betas)) + (1.0 - frac) * view(sched.log_beta_tilde)
    else:
        eps = out.double()
        logvar_p = view(sched.log_beta_tilde).expand_as(eps)
    x0_pred = (1.0 / view(sched.abar)).sqrt() * x_t - (1.0 / view(sched.abar) - 1.0).sqrt() * eps
    mean_p = view(sched.coef_x0) * x0_pred + view(sched.coef_xt) * x_t
    mean_q = view(sched.coef_x0) * x0 + view(sched.coef_xt) * x_t
    kl = normal_kl(mean_q, view(sched.log_beta_tilde), mean_p, logvar_p)
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p)
    per_dim = torch.where((t == 0)[:, None, None, None], nll, kl)
    return per_dim.flatten(1).mean(1) / math.log(2.0)


def loss_hybrid(model, x0, t, noise, sched, kind, vlb_weight=0.001):
    """L_simple + lambda T L_t (hybrid; the bound's part sees the mean frozen), or T L_t (vlb),
    averaged over the batch; the bound in float64."""
    abar = sched.abar[t].to(x0.dtype)[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
    out = model(x_t, t)
    learn_sigma = out.shape[1] == 2 * x0.shape[1]
    eps = out[:, :x0.shape[1]]
    timesteps = len(sched.betas)
    if kind == "vlb":
        return (timesteps * vb_terms_bits(out, x0.double(), x_t.double(), t, sched,
                                          learn_sigma)).mean()
    mse = ((eps - noise) ** 2).flatten(1).mean(1)
    frozen = torch.cat([eps.detach(), out[:, x0.shape[1]:]], dim=1)
    vb = vb_terms_bits(frozen, x0.double(), x_t.double(), t, sched, learn_sigma)
    return (mse.double() + vlb_weight * timesteps * vb).mean()


if __name__ == "__main__":
    model = UNet()
    print(sum(p.numel() for p in model.parameters()))
