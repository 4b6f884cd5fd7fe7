package modelgen

import "fmt"

// makeDivisible is torchvision's _make_divisible: round v to the nearest
// multiple of divisor, but never down by more than 10%.
func makeDivisible(v float64, divisor int) int {
	n := max(divisor, int(v+float64(divisor)/2)/divisor*divisor)
	if float64(n) < 0.9*v {
		n += divisor
	}
	return n
}

// bneck is one row of torchvision's MobileNetV3-Large
// inverted_residual_setting.
type bneck struct {
	in, k, expanded, out int
	se, hardSwish        bool
	stride               int
}

// mobileNetV3LargeSetting is torchvision's configuration for
// mobilenet_v3_large (width_mult 1.0, dilation 1, reduce_divider 1).
var mobileNetV3LargeSetting = []bneck{
	{16, 3, 16, 16, false, false, 1},
	{16, 3, 64, 24, false, false, 2},
	{24, 3, 72, 24, false, false, 1},
	{24, 5, 72, 40, true, false, 2},
	{40, 5, 120, 40, true, false, 1},
	{40, 5, 120, 40, true, false, 1},
	{40, 3, 240, 80, false, true, 2},
	{80, 3, 200, 80, false, true, 1},
	{80, 3, 184, 80, false, true, 1},
	{80, 3, 184, 80, false, true, 1},
	{80, 3, 480, 112, true, true, 1},
	{112, 3, 672, 112, true, true, 1},
	{112, 5, 672, 160, true, true, 2},
	{160, 5, 960, 160, true, true, 1},
	{160, 5, 960, 160, true, true, 1},
}

// SE layers are plain biased convolutions (no BatchNorm). fc1 feeds a ReLU;
// fc2 feeds HardSigmoid, so its output is centred around +1 to give gates
// of roughly 0.5-0.9 that still vary with the input.
var (
	seSqueezeNorm = norm{gamma: [2]float64{0.8, 1.2}, beta: [2]float64{-0.2, 0.2}}
	seExciteNorm  = norm{gamma: [2]float64{1.0, 2.0}, beta: [2]float64{0.5, 2.0}}
	hiddenNorm    = norm{gamma: [2]float64{0.8, 1.2}, beta: [2]float64{-0.3, 0.3}}
)

// mobileNetV3Large builds torchvision's mobilenet_v3_large with BatchNorm
// folded into the convolutions; Dropout is absent as in an eval-mode
// export.
func mobileNetV3Large(b *builder, x value) value {
	act := func(v value, scope string, hs bool) value {
		if hs {
			return b.hardSwish(v, scope+"/HardSwish")
		}
		return b.relu(v, scope+"/Relu")
	}
	y := b.conv(x, "/features/features.0/features.0.0/Conv", "features.0.0", 16, 3, 2, 1, bnAct)
	y = act(y, "/features/features.0/features.0.2", true)
	for i, s := range mobileNetV3LargeSetting {
		f := i + 1
		scope := fmt.Sprintf("/features/features.%d/block", f)
		param := fmt.Sprintf("features.%d.block", f)
		in := y
		j := 0 // index inside the block's Sequential
		h := y
		if s.expanded != s.in {
			h = b.conv(h, fmt.Sprintf("%s/block.%d/block.%d.0/Conv", scope, j, j), fmt.Sprintf("%s.%d.0", param, j), s.expanded, 1, 1, 1, bnAct)
			h = act(h, fmt.Sprintf("%s/block.%d/block.%d.2", scope, j, j), s.hardSwish)
			j++
		}
		h = b.conv(h, fmt.Sprintf("%s/block.%d/block.%d.0/Conv", scope, j, j), fmt.Sprintf("%s.%d.0", param, j), s.expanded, s.k, s.stride, s.expanded, bnAct)
		h = act(h, fmt.Sprintf("%s/block.%d/block.%d.2", scope, j, j), s.hardSwish)
		j++
		if s.se {
			h = b.squeezeExcite(h, fmt.Sprintf("%s/block.%d", scope, j), fmt.Sprintf("%s.%d", param, j), makeDivisible(float64(s.expanded/4), 8))
			j++
		}
		residual := s.stride == 1 && s.in == s.out
		projNorm := bnLinear
		if residual {
			projNorm = bnResidual
		}
		h = b.conv(h, fmt.Sprintf("%s/block.%d/block.%d.0/Conv", scope, j, j), fmt.Sprintf("%s.%d.0", param, j), s.out, 1, 1, 1, projNorm)
		if residual {
			h = b.add(h, in, fmt.Sprintf("/features/features.%d/Add", f))
		}
		y = h
	}
	last := len(mobileNetV3LargeSetting) + 1
	y = b.conv(y, fmt.Sprintf("/features/features.%d/features.%d.0/Conv", last, last), fmt.Sprintf("features.%d.0", last), 6*160, 1, 1, 1, bnAct)
	y = act(y, fmt.Sprintf("/features/features.%d/features.%d.2", last, last), true)
	y = value{b.op("GlobalAveragePool", "/avgpool/GlobalAveragePool", []string{y.name}), globalAvgPool(y.act)}
	y = value{b.op("Flatten", "/Flatten", []string{y.name}, attrInt("axis", 1)), y.act}
	y = b.gemm(y, "/classifier/classifier.0/Gemm", "classifier.0", 1280, hiddenNorm)
	y = act(y, "/classifier/classifier.1", true)
	return b.gemm(y, "/classifier/classifier.3/Gemm", "classifier.3", 1000, mobileNetClassifierNorm)
}

// squeezeExcite is torchvision's SqueezeExcitation with ReLU and
// HardSigmoid: x * hardsigmoid(fc2(relu(fc1(avgpool(x))))).
func (b *builder) squeezeExcite(x value, scope, param string, squeeze int) value {
	s := value{b.op("GlobalAveragePool", scope+"/avgpool/GlobalAveragePool", []string{x.name}), globalAvgPool(x.act)}
	s = b.conv(s, scope+"/fc1/Conv", param+".fc1", squeeze, 1, 1, 1, seSqueezeNorm)
	s = b.relu(s, scope+"/activation/Relu")
	s = b.conv(s, scope+"/fc2/Conv", param+".fc2", x.act.c, 1, 1, 1, seExciteNorm)
	s = b.hardSigmoid(s, scope+"/scale_activation/HardSigmoid")
	// torchvision computes scale * input; keep that operand order, which is
	// also the one OpenCV 4.6 imports correctly (it maps this broadcast Mul
	// to its Scale layer, which in 4.6 only works at batch size 1).
	return value{b.op("Mul", scope+"/Mul", []string{s.name, x.name}), mulChannel(x.act, s.act)}
}
