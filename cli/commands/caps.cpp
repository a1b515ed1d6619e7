// minivmm caps: the host as minivmm sees it.
#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/output.hpp"
#include "base/error.hpp"
#include "vmm/host_info.hpp"
#include "vmm/kvm/kvm.hpp"

namespace mvm::cli {

namespace {

class Caps : public Command {
public:
    CLI::App* add_to(CLI::App& app) override
    {
        auto* c = app.add_subcommand("caps", "the host as minivmm sees it: KVM capabilities, module parameters, "
                                             "THP, hugetlb pools, NUMA");
        c->add_flag("--json", json_, "JSON instead of a table");
        return c;
    }

    int run() override
    {
        Kvm kvm(kvm_device());
        auto info = host_info(kvm);
        if (json_)
            fmt::print("{}\n", info.dump(2));
        else
            fmt::print("{}", host_info_table(info));
        return kExitOk;
    }

private:
    bool json_ = false;
};

}  // namespace

std::unique_ptr<Command> caps_command() { return std::make_unique<Caps>(); }

}  // namespace mvm::cli
