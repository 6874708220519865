// The pickle inside a torch.save file (its data.pkl), read by our own interpreter of the
// small part of the pickle language that a dict of tensors uses, rather than by LibTorch's
// general unpickler, which trusts lengths from the stream (fuzzing found it allocating them,
// pytorch/pytorch#185443). It calls no Python callable: the few globals a dict of tensors
// names (torch._utils._rebuild_tensor_v2, the storage types, OrderedDict) are recognised by
// name and everything else is refused, so a malicious file can do nothing but fail to load.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ddpm {

/// The storage record `key` of a torch.save file (its data/<key>), or nullopt when there is
/// none; nbytes is what the pickle says it holds (the interpreter checks the record's size).
using StorageRecords =
    std::function<std::optional<std::vector<char>>(const std::string& key, uint64_t nbytes)>;

/// The dict of str -> tensor that the pickle `data_pkl` describes, its storages read through
/// records; throws std::runtime_error naming origin, the byte offset and what is wrong.
std::map<std::string, torch::Tensor> UnpickleTensorDict(std::string_view data_pkl,
                                                        const StorageRecords& records,
                                                        const std::string& origin);

}  // namespace ddpm
