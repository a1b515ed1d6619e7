// The paths the kvm tests run and read (kvm/kvm_test_util.hpp): the one
// file compiled with them, so the rest hit ccache from any checkout.
namespace mvm::test {

const char* minivmm_binary_path() { return MINIVMM_BINARY_PATH; }
const char* fuzz_dir_path() { return MINIVMM_FUZZ_DIR_PATH; }
const char* source_dir_path() { return MINIVMM_SOURCE_DIR_PATH; }

}  // namespace mvm::test
