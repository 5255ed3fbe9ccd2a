"""torchvision architectures, adapted to any number of classes and input channels.

The first convolution is rebuilt for inputs other than RGB and the classifier becomes
dropout + linear. Weights are freshly initialised: nothing is downloaded.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from imgcls.models.registry import classifier_head, register_model, with_in_channels


def _resnet(factory):  # type: ignore[no-untyped-def]
    def build(num_classes: int, in_channels: int, dropout: float) -> nn.Module:
        model = factory(weights=None)
        model.conv1 = with_in_channels(model.conv1, in_channels)
        model.fc = classifier_head(model.fc.in_features, num_classes, dropout)
        return model

    return build


# A ResNet's stride-32 stem and stages end on padded 1x1 maps at any size: no lower bound.
register_model("resnet18", min_image_size=8, why="a stride-32 network")(_resnet(tvm.resnet18))
register_model("resnet50", min_image_size=8, why="a stride-32 network")(_resnet(tvm.resnet50))


@register_model("vgg11_bn", min_image_size=32, why="five unpadded 2x max-pools")
def vgg11_bn(num_classes: int, in_channels: int, dropout: float) -> nn.Module:
    # VGG already has dropout in its classifier: the searched rate replaces its 0.5.
    model = tvm.vgg11_bn(weights=None, num_classes=num_classes, dropout=dropout)
    model.features[0] = with_in_channels(model.features[0], in_channels)
    return model


@register_model("densenet121", min_image_size=32,
                why="a stride-4 stem and three 2x average-pool transitions")
def densenet121(num_classes: int, in_channels: int, dropout: float) -> nn.Module:
    model = tvm.densenet121(weights=None)
    model.features.conv0 = with_in_channels(model.features.conv0, in_channels)
    model.classifier = classifier_head(model.classifier.in_features, num_classes, dropout)
    return model
