#include "trainer/unpickler.h"

#include <zip.h>

#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "base/errors.h"
#include "trainer/tensor_io.h"

namespace ddpm {
namespace {

// Containers nest at most this deep (a state dict's _metadata is 3 levels); deeper input is
// refused before freeing it could recurse far.
constexpr int kMaxDepth = 32;
constexpr int kMaxDims = 64;
constexpr std::size_t kMaxNameBytes = 1024;

struct Value;
using ValuePtr = std::shared_ptr<Value>;

// The callables and classes a dict of tensors names; any other global is refused.
enum class Global {
  kRebuildTensorV2,   // torch._utils._rebuild_tensor_v2
  kRebuildParameter,  // torch._utils._rebuild_parameter
  kOrderedDict,       // collections.OrderedDict
  kRestoreTypeTag,    // torch.jit._pickle.restore_type_tag (LibTorch's writer)
  kStorageType,       // torch.FloatStorage and the other typed storages
};

struct Value {
  enum class Kind {
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kTuple,
    kList,
    kDict,
    kGlobal,
    kStorage,
    kTensor
  };
  Kind kind = Kind::kNone;
  int64_t integer = 0;  // kBool, kInt
  double real = 0;
  std::string text;                                // kString; kGlobal: "module.name"
  std::vector<ValuePtr> items;                     // kTuple, kList
  std::vector<std::pair<ValuePtr, ValuePtr>> map;  // kDict, in insertion order
  Global global = Global::kStorageType;
  torch::ScalarType dtype = torch::kFloat;  // kGlobal (a storage type), kStorage
  torch::Tensor tensor;                     // kStorage (1-D, the whole storage), kTensor
  int depth = 0;
  // A list or dict that another container holds: it can no longer change, which rules out
  // cycles (only containers that nothing holds can grow, so nothing can come to hold itself).
  bool sealed = false;
};

const char* KindName(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return "a bool";
    case Value::Kind::kInt:
      return "an int";
    case Value::Kind::kFloat:
      return "a float";
    case Value::Kind::kString:
      return "a str";
    case Value::Kind::kTuple:
      return "a tuple";
    case Value::Kind::kList:
      return "a list";
    case Value::Kind::kDict:
      return "a dict";
    case Value::Kind::kGlobal:
      return "a class or function";
    case Value::Kind::kStorage:
      return "a storage";
    case Value::Kind::kTensor:
      return "a tensor";
  }
  return "a value";
}

std::optional<torch::ScalarType> StorageDtype(const std::string& name) {
  static const std::map<std::string, torch::ScalarType> kTypes = {
      {"FloatStorage", torch::kFloat},
      {"DoubleStorage", torch::kDouble},
      {"HalfStorage", torch::kHalf},
      {"BFloat16Storage", torch::kBFloat16},
      {"LongStorage", torch::kLong},
      {"IntStorage", torch::kInt},
      {"ShortStorage", torch::kShort},
      {"CharStorage", torch::kChar},
      {"ByteStorage", torch::kByte},
      {"BoolStorage", torch::kBool},
      {"ComplexFloatStorage", torch::kComplexFloat},
      {"ComplexDoubleStorage", torch::kComplexDouble}};
  const auto it = kTypes.find(name);
  if (it == kTypes.end()) return std::nullopt;
  return it->second;
}

class Interpreter {
 public:
  Interpreter(std::string_view data, const StorageRecords& records, std::string origin)
      : data_(data), records_(records), origin_(std::move(origin)) {}

  ValuePtr Run() {
    while (true) {
      op_at_ = pos_;
      const auto op = static_cast<uint8_t>(Byte());
      switch (op) {
        case 0x80: {  // PROTO
          const auto version = static_cast<uint8_t>(Byte());
          if (version > 5) Fail("pickle protocol " + std::to_string(version) + " is unknown");
          break;
        }
        case 0x95:
          Read(8);
          break;  // FRAME: a length that framing-unaware readers ignore
        case '(':
          marks_.push_back(stack_.size());
          break;
        case '.':
          return Stop();
        case 'N':
          Push(Make(Value::Kind::kNone));
          break;
        case 0x88:
          Push(Bool(true));
          break;  // NEWTRUE
        case 0x89:
          Push(Bool(false));
          break;  // NEWFALSE
        case 'J':
          Push(Int(static_cast<int32_t>(LittleEndian(4))));
          break;  // BININT
        case 'K':
          Push(Int(static_cast<uint8_t>(Byte())));
          break;  // BININT1
        case 'M':
          Push(Int(static_cast<int64_t>(LittleEndian(2))));
          break;  // BININT2
        case 0x8a:
          Push(Int(Long1()));
          break;  // LONG1
        case 'G':
          Push(Float());
          break;  // BINFLOAT
        case 'X':
          Push(String(Read(LittleEndian(4))));
          break;  // BINUNICODE
        case 0x8c:
          Push(String(Read(static_cast<uint8_t>(Byte()))));
          break;  // SHORT_BINUNICODE
        case 0x8d:
          Push(String(Read(LittleEndian(8))));
          break;  // BINUNICODE8
        case ')':
          Push(Tuple({}));
          break;  // EMPTY_TUPLE
        case 't':
          Push(Tuple(PopMark()));
          break;  // TUPLE
        case 0x85:
          Push(Tuple(PopN(1)));
          break;  // TUPLE1
        case 0x86:
          Push(Tuple(PopN(2)));
          break;  // TUPLE2
        case 0x87:
          Push(Tuple(PopN(3)));
          break;  // TUPLE3
        case ']':
          Push(Make(Value::Kind::kList));
          break;     // EMPTY_LIST
        case 'l': {  // LIST
          ValuePtr list = Make(Value::Kind::kList);
          for (ValuePtr& item : PopMark()) Insert(*list, std::move(item));
          Push(std::move(list));
          break;
        }
        case 'a': {  // APPEND
          ValuePtr item = Pop();
          Insert(Container(Value::Kind::kList), std::move(item));
          break;
        }
        case 'e': {  // APPENDS
          std::vector<ValuePtr> items = PopMark();
          Value& list = Container(Value::Kind::kList);
          for (ValuePtr& item : items) Insert(list, std::move(item));
          break;
        }
        case '}':
          Push(Make(Value::Kind::kDict));
          break;     // EMPTY_DICT
        case 'd': {  // DICT
          ValuePtr dict = Make(Value::Kind::kDict);
          SetItems(*dict, PopMark());
          Push(std::move(dict));
          break;
        }
        case 's': {  // SETITEM
          std::vector<ValuePtr> pair = PopN(2);
          SetItems(Container(Value::Kind::kDict), std::move(pair));
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<ValuePtr> items = PopMark();
          SetItems(Container(Value::Kind::kDict), std::move(items));
          break;
        }
        case 'c': {  // GLOBAL: "module\nname\n"
          const std::string module = Line();
          Push(Resolve(module, Line()));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          std::vector<ValuePtr> names = PopN(2);
          for (const ValuePtr& name : names) {
            if (name->kind != Value::Kind::kString) Fail("STACK_GLOBAL of a non-string name");
          }
          Push(Resolve(names[0]->text, names[1]->text));
          break;
        }
        case 'R': {  // REDUCE
          ValuePtr args = Pop();
          ValuePtr callable = Pop();
          Push(Reduce(*callable, *args));
          break;
        }
        case 'b': {  // BUILD: a state dict's _metadata attribute, which tensors do not need
          ValuePtr state = Pop();
          if (Top().kind != Value::Kind::kDict) {
            Fail(std::string("BUILD on ") + KindName(Top().kind) + ", expected an OrderedDict");
          }
          break;
        }
        case 'Q':
          Push(PersistentLoad(*Pop()));
          break;  // BINPERSID
        case 'q':
          Memoize(static_cast<uint8_t>(Byte()));
          break;  // BINPUT
        case 'r':
          Memoize(LittleEndian(4));
          break;  // LONG_BINPUT
        case 0x94:
          Memoize(memo_.size());
          break;  // MEMOIZE
        case 'h':
          Push(Recall(static_cast<uint8_t>(Byte())));
          break;  // BINGET
        case 'j':
          Push(Recall(LittleEndian(4)));
          break;  // LONG_BINGET
        default: {
          char hex[8];
          std::snprintf(hex, sizeof(hex), "0x%02x", op);
          Fail(std::string("opcode ") + hex +
               " is not one a dict of tensors uses (torch.save writes protocol 2)");
        }
      }
    }
  }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw FormatError(origin_ + ": data.pkl byte " + std::to_string(op_at_) + ": " + what);
  }

  char Byte() {
    if (pos_ >= data_.size()) Fail("the pickle ends without its STOP opcode");
    return data_[pos_++];
  }
  std::string_view Read(uint64_t n) {
    if (n > data_.size() - pos_) {
      Fail("a length of " + std::to_string(n) + " bytes runs past the end of the pickle (" +
           std::to_string(data_.size() - pos_) + " bytes left)");
    }
    const std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  uint64_t LittleEndian(int n) {
    const std::string_view bytes = Read(n);
    uint64_t value = 0;
    for (int i = n - 1; i >= 0; --i) value = (value << 8) | static_cast<uint8_t>(bytes[i]);
    return value;
  }
  int64_t Long1() {
    const auto n = static_cast<uint8_t>(Byte());
    if (n > 8) Fail("an integer of " + std::to_string(n) + " bytes does not fit in 64 bits");
    if (n == 0) return 0;
    uint64_t value = LittleEndian(n);
    if (n < 8 && (value >> (8 * n - 1)) != 0) value |= ~uint64_t{0} << (8 * n);  // sign-extend
    int64_t out;
    std::memcpy(&out, &value, sizeof(out));
    return out;
  }
  std::string Line() {
    const std::size_t end = data_.find('\n', pos_);
    if (end == std::string_view::npos) Fail("the pickle ends inside a GLOBAL name");
    if (end - pos_ > kMaxNameBytes) Fail("a GLOBAL name longer than 1024 bytes");
    std::string line(data_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return line;
  }

  static ValuePtr Make(Value::Kind kind) {
    auto value = std::make_shared<Value>();
    value->kind = kind;
    return value;
  }
  static ValuePtr Bool(bool flag) {
    ValuePtr value = Make(Value::Kind::kBool);
    value->integer = flag ? 1 : 0;
    return value;
  }
  static ValuePtr Int(int64_t integer) {
    ValuePtr value = Make(Value::Kind::kInt);
    value->integer = integer;
    return value;
  }
  ValuePtr Float() {
    const std::string_view bytes = Read(8);  // big-endian IEEE 754
    uint64_t bits = 0;
    for (char byte : bytes) bits = (bits << 8) | static_cast<uint8_t>(byte);
    ValuePtr value = Make(Value::Kind::kFloat);
    std::memcpy(&value->real, &bits, sizeof(bits));
    return value;
  }
  static ValuePtr String(std::string_view text) {
    ValuePtr value = Make(Value::Kind::kString);
    value->text = std::string(text);
    return value;
  }
  ValuePtr Tuple(std::vector<ValuePtr> items) {
    ValuePtr value = Make(Value::Kind::kTuple);
    for (ValuePtr& item : items) Hold(*value, *item);
    value->items = std::move(items);
    return value;
  }

  // Records that container now holds item (for the depth limit and sealing).
  void Hold(Value& container, Value& item) {
    // The container holds nothing yet that holds it (it is not sealed), so only itself could
    // close a cycle.
    if (&item == &container) Fail(std::string("puts ") + KindName(item.kind) + " inside itself");
    if (item.depth + 1 > kMaxDepth) {
      Fail("containers nest deeper than " + std::to_string(kMaxDepth) + " levels");
    }
    container.depth = std::max(container.depth, item.depth + 1);
    item.sealed = true;
  }
  void Insert(Value& list, ValuePtr item) {
    Hold(list, *item);
    list.items.push_back(std::move(item));
  }
  void SetItems(Value& dict, std::vector<ValuePtr> items) {
    if (items.size() % 2 != 0) Fail("a dict given an odd number of keys and values");
    for (std::size_t i = 0; i < items.size(); i += 2) {
      Hold(dict, *items[i]);
      Hold(dict, *items[i + 1]);
      dict.map.emplace_back(std::move(items[i]), std::move(items[i + 1]));
    }
  }

  void Push(ValuePtr value) { stack_.push_back(std::move(value)); }
  Value& Top() {
    if (stack_.size() <= Floor()) Fail("the stack is empty");
    return *stack_.back();
  }
  Value& Container(Value::Kind kind) {
    Value& top = Top();
    if (top.kind != kind) {
      Fail(std::string("expected ") + KindName(kind) + " to add to, found " + KindName(top.kind));
    }
    if (top.sealed)
      Fail(std::string("adds to ") + KindName(kind) + " that is already inside another");
    return top;
  }
  std::size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  ValuePtr Pop() {
    if (stack_.size() <= Floor()) Fail("the stack is empty");
    ValuePtr value = std::move(stack_.back());
    stack_.pop_back();
    return value;
  }
  std::vector<ValuePtr> PopN(std::size_t n) {
    if (stack_.size() < Floor() + n)
      Fail("the stack holds fewer than " + std::to_string(n) + " values");
    std::vector<ValuePtr> out(
        std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    return out;
  }
  std::vector<ValuePtr> PopMark() {
    if (marks_.empty()) Fail("no MARK to pop to");
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> out(
        std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(mark)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return out;
  }

  void Memoize(uint64_t index) {
    if (stack_.empty()) Fail("memoizes an empty stack");
    memo_[index] = stack_.back();
  }
  ValuePtr Recall(uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) Fail("memo " + std::to_string(index) + " was never stored");
    return it->second;
  }

  ValuePtr Resolve(const std::string& module, const std::string& name) {
    ValuePtr value = Make(Value::Kind::kGlobal);
    value->text = module + "." + name;
    if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      value->global = Global::kRebuildTensorV2;
    } else if (module == "torch._utils" && name == "_rebuild_parameter") {
      value->global = Global::kRebuildParameter;
    } else if (module == "collections" && name == "OrderedDict") {
      value->global = Global::kOrderedDict;
    } else if (module == "torch.jit._pickle" && name == "restore_type_tag") {
      value->global = Global::kRestoreTypeTag;
    } else if (const auto dtype = module == "torch" ? StorageDtype(name) : std::nullopt) {
      value->global = Global::kStorageType;
      value->dtype = *dtype;
    } else {
      Fail("refers to " + value->text + ", which a dict of tensors does not use (not called)");
    }
    return value;
  }

  const Value& Arg(const Value& args, std::size_t i, Value::Kind kind, const char* what) {
    const Value& arg = *args.items[i];
    if (arg.kind != kind) {
      Fail(std::string(what) + " is " + KindName(arg.kind) + ", expected " + KindName(kind));
    }
    return arg;
  }
  std::vector<int64_t> Ints(const Value& tuple, const char* what) {
    if (tuple.items.size() > kMaxDims) Fail(std::string(what) + " has more than 64 dimensions");
    std::vector<int64_t> out;
    for (const ValuePtr& item : tuple.items) {
      if (item->kind != Value::Kind::kInt || item->integer < 0) {
        Fail(std::string(what) + " holds something other than a non-negative int");
      }
      out.push_back(item->integer);
    }
    return out;
  }

  ValuePtr Reduce(const Value& callable, const Value& args) {
    if (callable.kind != Value::Kind::kGlobal) {
      Fail(std::string("REDUCE calls ") + KindName(callable.kind));
    }
    if (args.kind != Value::Kind::kTuple) Fail("REDUCE with arguments that are not a tuple");
    switch (callable.global) {
      case Global::kOrderedDict:
        if (!args.items.empty()) Fail("OrderedDict called with arguments");
        return Make(Value::Kind::kDict);
      case Global::kRestoreTypeTag:
        if (args.items.size() != 2) Fail("restore_type_tag needs 2 arguments");
        return args.items[0];
      case Global::kRebuildParameter: {
        if (args.items.size() != 3) Fail("_rebuild_parameter needs 3 arguments");
        Arg(args, 0, Value::Kind::kTensor, "the parameter's data");
        return args.items[0];
      }
      case Global::kRebuildTensorV2:
        return RebuildTensor(args);
      case Global::kStorageType:
        break;
    }
    Fail("REDUCE calls " + callable.text + ", which is a storage type, not a function");
  }

  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])
  ValuePtr RebuildTensor(const Value& args) {
    if (args.items.size() != 6 && args.items.size() != 7) {
      Fail("_rebuild_tensor_v2 needs 6 or 7 arguments, got " + std::to_string(args.items.size()));
    }
    const Value& storage = Arg(args, 0, Value::Kind::kStorage, "a tensor's storage");
    const int64_t offset = Arg(args, 1, Value::Kind::kInt, "a tensor's storage offset").integer;
    const std::vector<int64_t> sizes =
        Ints(Arg(args, 2, Value::Kind::kTuple, "a tensor's size"), "a tensor's size");
    const std::vector<int64_t> strides =
        Ints(Arg(args, 3, Value::Kind::kTuple, "a tensor's stride"), "a tensor's stride");
    if (sizes.size() != strides.size()) {
      Fail("a tensor with " + std::to_string(sizes.size()) + " sizes and " +
           std::to_string(strides.size()) + " strides");
    }
    const int64_t available = storage.tensor.numel();
    if (offset < 0 || offset > available) {
      Fail("a tensor's offset " + std::to_string(offset) + " is outside its storage of " +
           std::to_string(available) + " elements");
    }
    // The last element the view reaches must lie inside the storage (checked in 128 bits).
    bool empty = false;
    __int128 last = offset;
    for (std::size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] == 0) empty = true;
      last += static_cast<__int128>(sizes[d] - (sizes[d] > 0 ? 1 : 0)) * strides[d];
    }
    if (!empty && last >= available) {
      Fail("a tensor of size " + c10::str(c10::IntArrayRef(sizes)) + " and stride " +
           c10::str(c10::IntArrayRef(strides)) + " at offset " + std::to_string(offset) +
           " reaches past its storage of " + std::to_string(available) + " elements");
    }
    ValuePtr value = Make(Value::Kind::kTensor);
    value->tensor = storage.tensor.as_strided(sizes, strides, offset);
    return value;
  }

  // BINPERSID's ('storage', storage type, key, location, numel): the record data/<key>.
  ValuePtr PersistentLoad(const Value& pid) {
    if (pid.kind != Value::Kind::kTuple || pid.items.size() != 5 ||
        pid.items[0]->kind != Value::Kind::kString || pid.items[0]->text != "storage") {
      Fail("a persistent id that is not ('storage', type, key, location, numel)");
    }
    const Value& type = Arg(pid, 1, Value::Kind::kGlobal, "a storage's type");
    if (type.global != Global::kStorageType) Fail(type.text + " is not a storage type");
    const std::string& key = Arg(pid, 2, Value::Kind::kString, "a storage's key").text;
    Arg(pid, 3, Value::Kind::kString, "a storage's location");  // cuda:0 too: loaded to the CPU
    const int64_t numel = Arg(pid, 4, Value::Kind::kInt, "a storage's size").integer;
    const auto element = static_cast<int64_t>(c10::elementSize(type.dtype));
    if (numel < 0 || numel > std::numeric_limits<int64_t>::max() / 2 / element) {
      Fail("storage '" + key + "' of " + std::to_string(numel) + " elements");
    }
    const auto seen = storages_.find(key);
    if (seen != storages_.end()) {
      if (seen->second->dtype != type.dtype || seen->second->tensor.numel() != numel) {
        Fail("storage '" + key + "' is named twice with different types or sizes");
      }
      return seen->second;
    }
    const auto nbytes = static_cast<uint64_t>(numel * element);
    std::optional<std::vector<char>> record = records_(key, nbytes);
    if (!record) Fail("storage '" + key + "' has no record data/" + key);
    if (record->size() != nbytes) {
      Fail("record data/" + key + " holds " + std::to_string(record->size()) +
           " bytes, the pickle says " + std::to_string(numel) + " " + c10::toString(type.dtype) +
           " elements (" + std::to_string(nbytes) + " bytes)");
    }
    if (type.dtype == torch::kBool) {
      for (char byte : *record) {
        if (byte != 0 && byte != 1)
          Fail("bool storage '" + key + "' holds a byte other than 0 or 1");
      }
    }
    ValuePtr value = Make(Value::Kind::kStorage);
    value->dtype = type.dtype;
    value->tensor = torch::empty({numel}, torch::TensorOptions().dtype(type.dtype));
    if (nbytes > 0) std::memcpy(value->tensor.data_ptr(), record->data(), nbytes);
    storages_[key] = value;
    return value;
  }

  ValuePtr Stop() {
    if (!marks_.empty()) Fail("STOP inside a MARK that was never closed");
    if (stack_.size() != 1) {
      Fail("STOP with " + std::to_string(stack_.size()) + " values on the stack, expected 1");
    }
    return stack_.back();
  }

  std::string_view data_;
  const StorageRecords& records_;
  std::string origin_;
  std::size_t pos_ = 0;
  std::size_t op_at_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  std::map<std::string, ValuePtr> storages_;
};

// A torch.save zip archive in memory, its records named without the archive's folder.
class TorchZip {
 public:
  TorchZip(const std::vector<char>& bytes, std::string origin) : origin_(std::move(origin)) {
    zip_error_t error;
    zip_error_init(&error);
    zip_source_t* source = zip_source_buffer_create(bytes.data(), bytes.size(), 0, &error);
    if (source != nullptr) archive_ = zip_open_from_source(source, ZIP_RDONLY, &error);
    if (archive_ == nullptr) {
      const std::string message = zip_error_strerror(&error);
      if (source != nullptr) zip_source_free(source);
      zip_error_fini(&error);
      throw FormatError(origin_ + ": not a zip archive as torch.save writes (" + message + ")");
    }
    zip_error_fini(&error);
    // PyTorch's reader takes the folder of the first record as the archive's name.
    const char* first =
        zip_get_num_entries(archive_, 0) > 0 ? zip_get_name(archive_, 0, 0) : nullptr;
    const std::string name = first == nullptr ? "" : first;
    const std::size_t slash = name.find('/');
    if (slash == std::string::npos) {
      Close();
      throw FormatError(origin_ + ": a zip archive whose first member '" + name +
                        "' is not inside a folder; torch.save writes ARCHIVE/data.pkl");
    }
    prefix_ = name.substr(0, slash + 1);
  }
  ~TorchZip() { Close(); }
  TorchZip(const TorchZip&) = delete;
  TorchZip& operator=(const TorchZip&) = delete;

  /// The record `name` (under the archive's folder), or nullopt when there is none.
  std::optional<std::vector<char>> Record(const std::string& name) {
    const zip_int64_t index = zip_name_locate(archive_, (prefix_ + name).c_str(), 0);
    if (index < 0) return std::nullopt;
    zip_stat_t stat;
    if (zip_stat_index(archive_, index, 0, &stat) != 0 || (stat.valid & ZIP_STAT_SIZE) == 0) {
      throw FormatError(origin_ + ": record " + name + ": " + zip_strerror(archive_));
    }
    zip_file_t* member = zip_fopen_index(archive_, index, 0);
    if (member == nullptr) {
      throw FormatError(origin_ + ": record " + name + ": " + zip_strerror(archive_));
    }
    // Read in chunks, never trusting the size the directory claims for an allocation.
    std::vector<char> out;
    constexpr std::size_t kChunk = std::size_t{1} << 20;
    while (out.size() < stat.size) {
      const std::size_t want =
          static_cast<std::size_t>(std::min<uint64_t>(kChunk, stat.size - out.size()));
      const std::size_t at = out.size();
      out.resize(at + want);
      const zip_int64_t got = zip_fread(member, out.data() + at, want);
      if (got != static_cast<zip_int64_t>(want)) {
        const std::string message = zip_file_strerror(member);
        zip_fclose(member);
        throw FormatError(origin_ + ": record " + name + " is shorter than its " +
                          std::to_string(stat.size) + " bytes or damaged (" + message + ")");
      }
    }
    // Reading to the end lets libzip check the CRC.
    char extra;
    const zip_int64_t tail = zip_fread(member, &extra, 1);
    const std::string message = tail < 0 ? zip_file_strerror(member) : "";
    zip_fclose(member);
    if (tail != 0) {
      throw FormatError(origin_ + ": record " + name + " is damaged (" +
                        (tail < 0 ? message : "longer than its stated size") + ")");
    }
    return out;
  }

 private:
  void Close() {
    if (archive_ != nullptr) zip_discard(archive_);
    archive_ = nullptr;
  }

  std::string origin_;
  zip_t* archive_ = nullptr;
  std::string prefix_;
};

bool IsLegacyTorchSave(const std::vector<char>& bytes) {
  // The old format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
  static const char kMagic[] = "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
  return bytes.size() >= sizeof(kMagic) - 1 &&
         std::memcmp(bytes.data(), kMagic, sizeof(kMagic) - 1) == 0;
}

}  // namespace

std::map<std::string, torch::Tensor> UnpickleTensorDict(std::string_view data_pkl,
                                                        const StorageRecords& records,
                                                        const std::string& origin) {
  Interpreter interpreter(data_pkl, records, origin);
  const ValuePtr top = interpreter.Run();
  if (top->kind != Value::Kind::kDict) {
    throw FormatError(origin + ": holds " + KindName(top->kind) +
                      ", expected a dict of str -> tensor");
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& [key, value] : top->map) {
    if (key->kind != Value::Kind::kString) {
      throw FormatError(origin + ": a key is " + KindName(key->kind) +
                        ", expected a str naming a tensor");
    }
    if (value->kind != Value::Kind::kTensor) {
      throw FormatError(origin + ": '" + key->text + "' is " + KindName(value->kind) +
                        ", expected a tensor");
    }
    out[key->text] = value->tensor;
  }
  return out;
}

std::map<std::string, torch::Tensor> UnpickleTensors(const std::vector<char>& bytes,
                                                     const std::string& origin) {
  if (IsLegacyTorchSave(bytes)) {
    throw FormatError(
        origin +
        ": in torch.save's legacy format (PyTorch before 1.6, or "
        "_use_new_zipfile_serialization=False); load it in Python and torch.save it again");
  }
  TorchZip zip(bytes, origin);
  if (const std::optional<std::vector<char>> order = zip.Record("byteorder")) {
    const std::string text(order->begin(), order->end());
    if (text != "little") {
      throw FormatError(origin + ": byteorder '" + text + "'; only little-endian files are read");
    }
  }
  const std::optional<std::vector<char>> data_pkl = zip.Record("data.pkl");
  if (!data_pkl) throw FormatError(origin + ": no data.pkl record; not a torch.save file");
  return UnpickleTensorDict(
      std::string_view(data_pkl->data(), data_pkl->size()),
      [&zip](const std::string& key, uint64_t) { return zip.Record("data/" + key); }, origin);
}

}  // namespace ddpm
