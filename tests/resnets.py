"""ResNets with torchvision's layout (torchvision.models.resnet), written out for the tests.

The blocks spell the residual add and the ReLU in every way torchvision's
code and common variants do; `spelling` picks one per block:
  "torchvision"  self.relu = nn.ReLU(inplace=True); out += identity
  "functional"   F.relu(out); out = out + identity
  "torch"        torch.relu(out); torch.add(out, identity)
  "method"       out.relu(); out = identity + out
"""
import torch
import torch.nn.functional as F
from torch import nn

SPELLINGS = ("torchvision", "functional", "torch", "method")


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Block(nn.Module):
    def _act(self, out):
        if self.spelling == "torchvision":
            return self.relu(out)
        if self.spelling == "functional":
            return F.relu(out)
        if self.spelling == "torch":
            return torch.relu(out)
        return out.relu()

    def _add(self, out, identity):
        if self.spelling == "torchvision":
            out += identity
            return out
        if self.spelling == "functional":
            return out + identity
        if self.spelling == "torch":
            return torch.add(out, identity)
        return identity + out


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, spelling="torchvision"):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.spelling = spelling

    def forward(self, x):
        identity = x
        out = self._act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self._act(self._add(out, identity))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, spelling="torchvision"):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.spelling = spelling

    def forward(self, x):
        identity = x
        out = self._act(self.bn1(self.conv1(x)))
        out = self._act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self._act(self._add(out, identity))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=10, width=64, spellings=("torchvision",)):
        super().__init__()
        self.inplanes = width
        self._spellings = spellings
        self._blocks = 0
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def _next_spelling(self):
        spelling = self._spellings[self._blocks % len(self._spellings)]
        self._blocks += 1
        return spelling

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self._next_spelling())]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, spelling=self._next_spelling()))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def bottleneck_resnet(**kwargs):
    """ResNet-50's block and layout, fewer blocks (a ResNet-26) for test speed."""
    return ResNet(Bottleneck, [2, 2, 2, 2], **kwargs)
