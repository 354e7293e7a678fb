"""Networks of Fast-ODE: the DDPM++ U-Net, the learned encoder, the 2D MLPs, and the flow.

``build_network(config)`` and ``build_encoder(config)`` build from the paper's
JSON configs. The registry below maps ``unet_type`` to a constructor.
"""
from models.config import ConfigError, check_encoder_decoder, load_config, validate_config
from models.encoder import Encoder
from models.losses import kl_per_dim
from models.songunet import SongUNet


def _build_songunet(config):
    return SongUNet(
        img_resolution=config["img_resolution"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=config["model_channels"],
        channel_mult=list(config["channel_mult"]),
        channel_mult_emb=config["channel_mult_emb"],
        num_blocks=config["num_blocks"],
        attn_resolutions=list(config["attn_resolutions"]),
        dropout=config["dropout"],
        channel_mult_noise=config["channel_mult_noise"],
        resample_filter=list(config["resample_filter"]),
    )


NETWORKS = {"songunet": _build_songunet}


def build_network(config, name="config"):
    """Build the velocity U-Net named by ``config["unet_type"]``; ``net(x, t)``."""
    config = validate_config(config, name)
    return NETWORKS[config["unet_type"]](config)


def build_encoder(config, name="encoder config"):
    """Build the learned coupling q(z|x); its U-Net must have ``out_channels = 2 * in_channels``."""
    config = validate_config(config, name)
    if config["out_channels"] != 2 * config["in_channels"]:
        raise ConfigError(f"{name}: out_channels must be 2 x in_channels = {2 * config['in_channels']} "
                          f"(mu and logvar), got {config['out_channels']}")
    return Encoder(NETWORKS[config["unet_type"]](config), config["in_channels"])


__all__ = ["build_network", "build_encoder", "validate_config", "load_config", "check_encoder_decoder", "ConfigError", "SongUNet", "Encoder",
           "kl_per_dim", "NETWORKS"]
