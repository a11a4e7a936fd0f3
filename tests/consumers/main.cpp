// The program each consumer project builds: a rank-2 update with a known answer.
#include <lowrank/io/safetensors.hpp>
#include <lowrank/lowrank.hpp>

#include <cstdio>
#include <filesystem>

int main() {
  // W (2x3) += 0.5 * U V^T, U = [[1, 2], [3, 4]], V = [[1, 0], [0, 1], [1, 1]].
  Eigen::MatrixXf w = Eigen::MatrixXf::Ones(2, 3);
  Eigen::MatrixXf u(2, 2), v(3, 2);
  u << 1, 2, 3, 4;
  v << 1, 0, 0, 1, 1, 1;
  lowrank::rank_update(w, u, v, 0.5);
  const float expected[2][3] = {{1.5f, 2.0f, 2.5f}, {2.5f, 3.0f, 4.5f}};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      if (w(i, j) != expected[i][j]) {
        std::printf("W(%d, %d) = %g, expected %g\n", i, j, w(i, j), expected[i][j]);
        return 1;
      }
  // lowrank::io: write W as safetensors, read it back.
  const auto file = std::filesystem::temp_directory_path() / "lowrank_consumer_w.safetensors";
  Eigen::Matrix<float, 2, 3, Eigen::RowMajor> wr = w;
  const std::vector<lowrank::io::TensorData> tensors{
      {{"w", lowrank::io::Dtype::F32, {2, 3}}, std::as_bytes(std::span(wr.data(), 6))}};
  lowrank::io::write_safetensors(file, tensors);
  const auto st = lowrank::io::SafetensorsFile::open(file);
  const auto read = st.matrix<float>("w");
  if (read.rows != 2 || read.cols != 3 || read(1, 2) != 4.5f) {
    std::printf("safetensors round trip failed\n");
    return 1;
  }
  std::filesystem::remove(file);
  try {
    lowrank::rank_update(w, u, Eigen::MatrixXf(4, 2), 1.0);
    std::printf("a shape error was not reported\n");
    return 1;
  } catch (const lowrank::Error& e) {
    std::printf("lowrank %d.%d.%d on %s: ok (error check: %s)\n", LOWRANK_VERSION_MAJOR, LOWRANK_VERSION_MINOR,
                LOWRANK_VERSION_PATCH, std::string(lowrank::to_string(lowrank::active_target())).c_str(), e.what());
  }
  return 0;
}
