// Loads a TorchScript GNCNN saved from Python and runs forward and backward
// in C++: the gnflex ops come from the linked gnflex_ops library.
//
//   gncnn_infer model.pt [batch]
//
// Prints the logits and the gradient norm of the input so a test can compare
// them with Python. Input: torch::manual_seed(0) then randn(batch, 3, 64, 64).
#include <torch/script.h>
#include <torch/torch.h>

#include <cstdio>
#include <iostream>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " model.pt [batch]\n";
    return 2;
  }
  const int64_t batch = argc > 2 ? std::atoll(argv[2]) : 2;
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    torch::manual_seed(0);
    torch::Tensor x = torch::randn({batch, 3, 64, 64}).requires_grad_(true);
    torch::Tensor logits = model.forward({x}).toTensor();
    logits.sum().backward();
    std::printf("logits");
    for (int64_t i = 0; i < logits.numel(); ++i) std::printf(" %.8e", logits.flatten()[i].item<double>());
    std::printf("\ngrad_norm %.8e\n", x.grad().norm().item<double>());
    // The op is also reachable directly, through the dispatcher.
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gnflex::group_norm", "");
    std::printf("op %s registered\n", op.schema().name().c_str());
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
