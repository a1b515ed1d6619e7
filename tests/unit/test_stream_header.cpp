// The migration stream's HEADER (migration/stream.hpp) without a VM: its
// encoding round trip and the layout checks a receiver makes with it.
#include <gtest/gtest.h>

#include "base/error.hpp"
#include "migration/stream.hpp"

using mvm::migration::StreamHeader;

namespace {

StreamHeader two_slots(const std::string& uuid)
{
    StreamHeader h;
    h.nr_vcpus = 2;
    h.nr_channels = 2;
    h.slots = {{0, 0, 0, 64 << 20, -1, 4096}, {1, 0, 1ull << 32, 64 << 20, 1, 2 << 20}};
    h.uuid = uuid;
    return h;
}

}  // namespace

TEST(StreamHeader, EncodesAndDecodesEveryFieldUuidIncluded)
{
    for (const std::string uuid : {"", "11111111-1111-1111-1111-111111111111"}) {
        const StreamHeader h = two_slots(uuid);
        const StreamHeader back = StreamHeader::decode(h.encode());
        EXPECT_EQ(back.nr_vcpus, 2u);
        EXPECT_EQ(back.nr_channels, 2u);
        EXPECT_EQ(back.slots, h.slots);
        EXPECT_EQ(back.uuid, uuid);
        EXPECT_EQ(h.incompatibility(back), "");
    }
}

TEST(StreamHeader, ADifferentUuidIsRefusedWithQemusWordsAMissingOneIsNot)
{
    const std::string a = "11111111-1111-1111-1111-111111111111", b = "22222222-2222-2222-2222-222222222222";
    // incompatibility() is asked of the receiver's header about the sender's.
    EXPECT_EQ(two_slots(b).incompatibility(two_slots(a)), "UUID received is " + a + " and local is " + b);
    EXPECT_EQ(two_slots("").incompatibility(two_slots(a)), "");  // QEMU: the local one is not set
    EXPECT_EQ(two_slots(b).incompatibility(two_slots("")), "");  // the sender does not validate
}

TEST(StreamHeader, AUuidOfAnotherLengthIsACorruptStream)
{
    std::vector<uint8_t> p = two_slots("").encode();
    p.resize(p.size() - 4);
    const uint32_t five = 5;
    p.insert(p.end(), reinterpret_cast<const uint8_t*>(&five), reinterpret_cast<const uint8_t*>(&five) + 4);
    p.insert(p.end(), {'a', 'b', 'c', 'd', 'e'});
    EXPECT_THROW(StreamHeader::decode(p), mvm::Error);
}
