package modelgen

import "fmt"

// The classifiers' final Gemm sets the logits' spread: centred per class
// on the calibration batch and scaled so that on natural images the logits'
// std is about 1-3, a softmax that is peaked but far from one-hot over
// 1000 classes. The calibration batch includes white noise, which drives
// logits harder than photos do, hence the different targets per network.
var (
	resNetClassifierNorm    = norm{gamma: [2]float64{3.5, 4.5}, beta: [2]float64{-0.5, 0.5}}
	mobileNetClassifierNorm = norm{gamma: [2]float64{1.5, 2.5}, beta: [2]float64{-0.5, 0.5}}
)

// resNet50 builds torchvision's resnet50 (v1.5: the stride is on the 3x3
// conv of each bottleneck) with BatchNorm folded into the convolutions.
// Node and parameter names follow torch.onnx.export of the torchvision
// module.
func resNet50(b *builder, x value) value {
	y := b.conv(x, "/conv1/Conv", "conv1", 64, 7, 2, 1, bnAct)
	y = b.relu(y, "/relu/Relu")
	y = b.maxPool(y, "/maxpool/MaxPool", 3, 2, 1)
	layers := []struct{ width, blocks, stride int }{{64, 3, 1}, {128, 4, 2}, {256, 6, 2}, {512, 3, 2}}
	for li, l := range layers {
		for bi := 0; bi < l.blocks; bi++ {
			scope := fmt.Sprintf("/layer%d/layer%d.%d", li+1, li+1, bi)
			param := fmt.Sprintf("layer%d.%d", li+1, bi)
			stride := 1
			if bi == 0 {
				stride = l.stride
			}
			h := b.conv(y, scope+"/conv1/Conv", param+".conv1", l.width, 1, 1, 1, bnAct)
			h = b.relu(h, scope+"/relu/Relu")
			h = b.conv(h, scope+"/conv2/Conv", param+".conv2", l.width, 3, stride, 1, bnAct)
			h = b.relu(h, scope+"/relu_1/Relu")
			h = b.conv(h, scope+"/conv3/Conv", param+".conv3", 4*l.width, 1, 1, 1, bnResidual)
			identity := y
			if bi == 0 {
				// The first block of every stage changes the channel count
				// (and, after layer1, the resolution), so the shortcut is a
				// strided 1x1 projection.
				identity = b.conv(y, scope+"/downsample/downsample.0/Conv", param+".downsample.0", 4*l.width, 1, stride, 1, bnLinear)
			}
			y = b.add(h, identity, scope+"/Add")
			y = b.relu(y, scope+"/relu_2/Relu")
		}
	}
	y = value{b.op("GlobalAveragePool", "/avgpool/GlobalAveragePool", []string{y.name}), globalAvgPool(y.act)}
	y = value{b.op("Flatten", "/Flatten", []string{y.name}, attrInt("axis", 1)), y.act}
	return b.gemm(y, "/fc/Gemm", "fc", 1000, resNetClassifierNorm)
}
