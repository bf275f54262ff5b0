"""Train a timm model on FFCV betons with DeepSpeed and the AutoWU scheduler (``autowu/launcher/train.py``).

    deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/resnet50_4k.json \
        --data_dir /data/imagenet_betons --out_dir runs/rn50_4k

    # the embedded default: scikit-learn's digits, 2 CPU ranks, a minute or two
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_digits.json

``python -m autowu.launcher`` is the same command; ``--help`` lists the options.
"""
from autowu.launcher.console import quiet_third_party

quiet_third_party()  # before DeepSpeed is imported: its import already logs (``--verbose`` keeps it all)

from autowu.launcher.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
