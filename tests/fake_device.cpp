// The test accelerator (see tests/fake_device.py): PyTorch's PrivateUse1 device, backed by host memory.
//
// - An allocator that counts the bytes it holds (resident_bytes, peak_bytes).
// - Tensor creation, views, copies and resize as a backend must provide them.
// - Every other operator runs through one boxed fallback: the device tensors' memory is viewed as CPU tensors
//   (no copy), the CPU kernel runs, and what it returns is handed back as device tensors (a new result keeps
//   its CPU buffer, re-labelled as device memory and counted). A CPU tensor with dimensions mixed into an
//   operator with device tensors raises, as CUDA does (0-dim CPU tensors pass, as on CUDA).
// - Counters for what costs a host-device sync on a GPU: reading a value (item / bool / float) and copies
//   from the device to the host, the blocking ones apart.
// - Streams and events (a guard of its own): a copy device -> host with non_blocking on a side stream is
//   deferred, as a GPU would still be running it, until something waits for it: an event recorded after it on
//   that stream (event.synchronize(), another stream's wait_event), the stream itself, or the next operator on
//   that stream. A host reader that does not wait reads what the host memory held before. The events waited
//   on are recorded, for the tests.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/InferSize.h>
#include <ATen/TensorUtils.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

using c10::DeviceType;
using c10::DispatchKey;

std::atomic<int64_t> resident{0};
std::atomic<int64_t> peak{0};
std::atomic<int64_t> reads{0};       // _local_scalar_dense: item(), bool(), float() of a device tensor
std::atomic<int64_t> to_host{0};     // copies device -> host
std::atomic<int64_t> to_device{0};   // copies host -> device
std::atomic<int64_t> to_host_blocking{0};  // copies device -> host without non_blocking (the host waits for each)

void add_bytes(int64_t n) {
  int64_t now = resident.fetch_add(n) + n;
  int64_t old = peak.load();
  while (now > old && !peak.compare_exchange_weak(old, now)) {
  }
}

struct Block {
  void* data;
  int64_t bytes;
  c10::intrusive_ptr<c10::StorageImpl> keep;  // a CPU buffer adopted as device memory (else null)
};

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  resident.fetch_sub(block->bytes);
  if (!block->keep) {
    c10::free_cpu(block->data);
  }
  delete block;
}

struct DeviceAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* data = n ? c10::alloc_cpu(n) : nullptr;
    add_bytes(static_cast<int64_t>(n));
    auto* block = new Block{data, static_cast<int64_t>(n), {}};
    return {data, block, &free_block, c10::Device(DeviceType::PrivateUse1, 0)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const final { std::memcpy(dest, src, count); }
};

DeviceAllocator allocator;

const c10::DispatchKeySet device_keys{DispatchKey::PrivateUse1};

bool on_device(const at::Tensor& t) { return t.defined() && t.device().type() == DeviceType::PrivateUse1; }

// A CPU tensor viewing the device tensor's memory (no copy; valid while `t` lives).
at::Tensor host_view(const at::Tensor& t) {
  auto storage = t.storage();
  c10::Storage host(c10::Storage::use_byte_size_t(), storage.nbytes(),
                    c10::DataPtr(storage.mutable_data(), c10::Device(DeviceType::CPU)), c10::GetAllocator(DeviceType::CPU),
                    true);  // an out= kernel may resize it: see write_back
  auto out = at::detail::make_tensor<c10::TensorImpl>(std::move(host), c10::DispatchKeySet(DispatchKey::CPU),
                                                      t.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  out._set_conj(t.is_conj());  // a lazy conjugate / negative view stays one: the CPU kernels resolve it
  out._set_neg(t.is_neg());
  return out;
}

at::Tensor device_tensor(c10::Storage storage, const at::Tensor& like) {
  auto out = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), device_keys, like.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  return out;
}

// A CPU result handed back as a device tensor: its buffer is adopted (counted as device memory).
at::Tensor adopt(const at::Tensor& cpu) {
  auto impl = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(cpu.storage().unsafeGetStorageImpl());
  int64_t bytes = static_cast<int64_t>(impl->nbytes());
  void* data = impl->mutable_data();
  add_bytes(bytes);
  auto* block = new Block{data, bytes, impl};
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes,
                       c10::DataPtr(data, block, &free_block, c10::Device(DeviceType::PrivateUse1, 0)),
                       &allocator, true);
  return device_tensor(std::move(storage), cpu);
}

// ---- streams and events --------------------------------------------------------------------------------

using c10::StreamId;

struct Deferred {  // a copy device -> host on a side stream, not done yet
  StreamId stream;
  int64_t order;
  at::Tensor source;  // the device tensor (kept alive, as the caching allocator keeps a recorded block)
  at::Tensor target;  // the host tensor
};

struct Event {
  StreamId stream = 0;
  int64_t order = -1;  // the copies on `stream` up to this one come before the event
};

std::mutex queue_mutex;
std::vector<Deferred> deferred;
std::atomic<int64_t> deferred_count{0};
int64_t issued = 0;                 // copies deferred so far (their order)
StreamId next_stream = 0;           // side streams handed out so far
std::vector<int64_t> waited;        // the events waited on (their ids, as torch.Event.event_id reads them)
std::atomic<int64_t> host_waits{0};  // event.synchronize(), stream.synchronize(), device synchronize
thread_local StreamId current_stream = 0;

// Runs the deferred copies on `stream` up to `order` (all streams when stream < 0).
void run_deferred(StreamId stream, int64_t order) {
  if (!deferred_count.load()) return;
  std::lock_guard<std::mutex> lock(queue_mutex);
  std::vector<Deferred> left;
  for (auto& copy : deferred) {
    if ((stream < 0 || copy.stream == stream) && copy.order <= order) {
      copy.target.copy_(host_view(copy.source));
    } else {
      left.push_back(std::move(copy));
    }
  }
  deferred.swap(left);
  deferred_count.store(static_cast<int64_t>(deferred.size()));
}

void run_all_on(StreamId stream) { run_deferred(stream, INT64_MAX); }

void defer(const at::Tensor& source, const at::Tensor& target) {
  std::lock_guard<std::mutex> lock(queue_mutex);
  deferred.push_back({current_stream, issued++, source, target});
  deferred_count.store(static_cast<int64_t>(deferred.size()));
}

struct StreamGuard final : c10::impl::DeviceGuardImplInterface {
  static c10::Device the_device() { return c10::Device(DeviceType::PrivateUse1, 0); }
  DeviceType type() const override { return DeviceType::PrivateUse1; }
  c10::Device exchangeDevice(c10::Device) const override { return the_device(); }
  c10::Device getDevice() const override { return the_device(); }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const noexcept override {
    return c10::Stream(c10::Stream::UNSAFE, d, current_stream);
  }
  c10::Stream getDefaultStream(c10::Device d) const override { return c10::Stream(c10::Stream::UNSAFE, d, 0); }
  c10::Stream getNewStream(c10::Device d, int) const override {
    std::lock_guard<std::mutex> lock(queue_mutex);
    return c10::Stream(c10::Stream::UNSAFE, d, ++next_stream);
  }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool) const override { return getNewStream(d, 0); }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override {
    auto old = current_stream;
    current_stream = s.id();
    return c10::Stream(c10::Stream::UNSAFE, s.device(), old);
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }

  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex, const c10::EventFlag) const override {
    if (!*event) *event = new Event();  // never freed: an id stays one event's (tests compare ids)
    auto* e = static_cast<Event*>(*event);
    std::lock_guard<std::mutex> lock(queue_mutex);
    e->stream = stream.id();
    e->order = issued - 1;
  }
  void block(void* event, const c10::Stream&) const override { wait(event); }
  bool queryEvent(void* event) const override {
    wait(event);
    return true;
  }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  void synchronizeEvent(void* event) const override {
    host_waits.fetch_add(1);
    wait(event);
  }
  bool queryStream(const c10::Stream& stream) const override {
    run_all_on(stream.id());
    return true;
  }
  void synchronizeStream(const c10::Stream& stream) const override {
    host_waits.fetch_add(1);
    run_all_on(stream.id());
  }
  void synchronizeDevice(const c10::DeviceIndex) const override {
    host_waits.fetch_add(1);
    run_deferred(-1, INT64_MAX);
  }
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}

 private:
  static void wait(void* event) {
    if (!event) return;  // never recorded: nothing to wait for
    auto* e = static_cast<Event*>(event);
    {
      std::lock_guard<std::mutex> lock(queue_mutex);
      waited.push_back(reinterpret_cast<int64_t>(event));
    }
    run_deferred(e->stream, e->order);
  }
};

struct Arg {
  at::Tensor device;  // the device tensor given
  at::Tensor host;    // its CPU view, given to the CPU kernel
};

[[noreturn]] void mixed(const c10::OperatorHandle& op) {
  TORCH_CHECK(false, "Expected all tensors to be on the same device, but found at least two devices, "
                     "fakegpu:0 and cpu! (the test device; operator ", op.schema().name(), ")");
}

at::Tensor to_host_arg(const at::Tensor& t, std::vector<Arg>& args, bool& host_tensor) {
  if (on_device(t)) {
    args.push_back({t, host_view(t)});
    return args.back().host;
  }
  if (t.defined() && t.dim() > 0) host_tensor = true;
  return t;
}

at::Tensor to_device_result(const at::Tensor& out, const std::vector<Arg>& args) {
  if (!out.defined() || out.device().type() != DeviceType::CPU) return out;
  for (const auto& arg : args) {
    if (out.is_same(arg.host)) return arg.device;  // in-place / out=
  }
  for (const auto& arg : args) {  // a view of an argument
    const auto& storage = arg.host.storage();
    if (out.storage().is_alias_of(storage) || out.storage().data() == storage.data()) {
      return device_tensor(arg.device.storage(), out);
    }
  }
  return adopt(out);
}

const at::Tensor& grow(const at::Tensor& self, c10::IntArrayRef size, std::optional<at::MemoryFormat>);

// An out= kernel resized the CPU view of a device tensor: the device tensor takes the new shape (and data).
void write_back(const Arg& arg) {
  const auto& host = arg.host;
  const auto& dev = arg.device;
  const bool moved = host.storage().data() != dev.storage().data();
  if (!moved && host.sizes() == dev.sizes() && host.strides() == dev.strides() &&
      host.storage_offset() == dev.storage_offset()) {
    return;
  }
  if (moved) {
    grow(dev, host.sizes(), std::nullopt);
    host_view(dev).copy_(host);
  } else {
    dev.unsafeGetTensorImpl()->set_sizes_and_strides(host.sizes(), host.strides(), host.storage_offset());
  }
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto count = schema.arguments().size();
  std::vector<Arg> args;
  bool host_tensor = false;
  auto first = stack->size() - count;
  for (size_t i = first; i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor()) {
      value = to_host_arg(value.toTensor(), args, host_tensor);
    } else if (value.isTensorList()) {
      auto list = value.toTensorList();
      for (size_t j = 0; j < list.size(); ++j) list[j] = to_host_arg(list[j], args, host_tensor);
      value = list;
    } else if (value.isList()) {
      auto list = value.toList();
      for (size_t j = 0; j < list.size(); ++j) {
        c10::IValue item = list.get(j);
        if (item.isTensor()) list.set(j, to_host_arg(item.toTensor(), args, host_tensor));
      }
    } else if (value.isDevice() && value.toDevice().type() == DeviceType::PrivateUse1) {
      value = c10::Device(DeviceType::CPU);
    }
  }
  if (host_tensor && !args.empty()) mixed(op);
  run_all_on(current_stream);  // a stream runs in order: what was deferred on it is done before this
  if (schema.name() == "aten::_local_scalar_dense") reads.fetch_add(1);
  op.redispatchBoxed(c10::DispatchKeySet(DispatchKey::CPU), stack);
  for (const auto& arg : args) write_back(arg);
  const auto returns = schema.returns().size();
  for (size_t i = stack->size() - returns; i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor()) {
      value = to_device_result(value.toTensor(), args);
    } else if (value.isTensorList()) {
      auto list = value.toTensorList();
      for (size_t j = 0; j < list.size(); ++j) list[j] = to_device_result(list[j], args);
      value = list;
    }
  }
}

// ---- what a backend provides itself ------------------------------------------------------------------

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<at::ScalarType> dtype,
                               std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>,
                               std::optional<at::MemoryFormat> memory_format) {
  return at::detail::empty_generic(size, &allocator, device_keys, c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided_(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>) {
  return at::detail::empty_strided_generic(size, stride, &allocator, device_keys, c10::dtype_or_default(dtype));
}

at::Tensor strided_view(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> offset) {
  auto out = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(self.storage()),
                                                      self.key_set(), self.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride, offset.value_or(self.storage_offset()));
  return out;
}

at::Tensor shaped_view(const at::Tensor& self, c10::IntArrayRef size) {
  auto inferred = at::infer_size_dv(size, self.numel());
  auto stride = at::detail::computeStride(self.sizes(), self.strides(), inferred);
  TORCH_CHECK(stride.has_value(), "view size is not compatible with input tensor's size and stride; use .reshape");
  return strided_view(self, inferred, *stride, self.storage_offset());
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return strided_view(self, size, stride, self.storage_offset());
}

const at::Tensor& grow(const at::Tensor& self, c10::IntArrayRef size, std::optional<at::MemoryFormat>) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_sizes_contiguous(size);
  const auto needed = static_cast<size_t>((impl->storage_offset() + impl->numel()) * self.element_size());
  if (needed > self.storage().nbytes()) {
    auto bigger = allocator.allocate(needed);
    auto storage = self.storage();
    if (storage.nbytes()) std::memcpy(bigger.get(), storage.data(), storage.nbytes());
    storage.set_data_ptr_noswap(std::move(bigger));
    storage.set_nbytes(needed);
  }
  return self;
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source, c10::SymInt offset, c10::SymIntArrayRef size,
                        c10::SymIntArrayRef stride) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  impl->set_sizes_and_strides(c10::asIntArrayRefUnchecked(size), c10::asIntArrayRefUnchecked(stride),
                              offset.expect_int());
  return self;
}

at::Tensor& set_whole_storage(at::Tensor& self, c10::Storage source) {
  const int64_t count = static_cast<int64_t>(source.nbytes()) / static_cast<int64_t>(self.dtype().itemsize());
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  const int64_t size[1] = {count}, stride[1] = {1};
  impl->set_sizes_and_strides(c10::IntArrayRef(size), c10::IntArrayRef(stride), 0);
  return self;
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(source.storage());
  impl->set_sizes_and_strides(source.sizes(), source.strides(), source.storage_offset());
  return self;
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  if (on_device(self) && !on_device(dst)) {
    to_host.fetch_add(1);
    if (!non_blocking) to_host_blocking.fetch_add(1);
    if (non_blocking && current_stream != 0) {  // runs when waited for, after the copies deferred before it
      defer(self, dst);
      return dst;
    }
  }
  run_all_on(current_stream);  // this copy runs now: what was deferred on its stream ran before it
  if (!on_device(self) && on_device(dst)) to_device.fetch_add(1);
  auto src = on_device(self) ? host_view(self) : self;
  auto out = on_device(dst) ? host_view(dst) : dst;
  out.copy_(src);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  grow(dst, self.sizes(), std::nullopt);
  return copy_from(self, dst, false);
}

// the caching allocator's business on CUDA; here a deferred copy keeps its source alive itself
void record_stream(at::Tensor&, c10::Stream) {}

// convolutions reach a device that is not CPU / CUDA as the "overrideable" operators
at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, bool transposed,
                       c10::IntArrayRef output_padding, int64_t groups) {
  std::optional<at::Tensor> host_bias;
  if (bias.has_value() && bias->defined()) host_bias = host_view(*bias);
  return adopt(at::convolution(host_view(input), host_view(weight), host_bias, stride, padding, dilation, transposed,
                               output_padding, groups));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool transposed, c10::IntArrayRef output_padding,
    int64_t groups, std::array<bool, 3> output_mask) {
  std::vector<int64_t> bias_size{transposed ? weight.size(1) * groups : weight.size(0)};
  auto [gi, gw, gb] = at::convolution_backward(host_view(grad_output), host_view(input), host_view(weight),
                                               c10::IntArrayRef(bias_size), stride, padding, dilation, transposed,
                                               output_padding, groups, output_mask);
  auto back = [](const at::Tensor& t) { return t.defined() ? adopt(t) : t; };
  return {back(gi), back(gw), back(gb)};
}

// `param.data = tensor` between the host and the device is allowed as between CPU and CUDA (torch lists the
// dense backends that may exchange storages, and PrivateUse1 is not among them)
bool compatible_shallow_copy(const at::Tensor& self, const at::Tensor& from) {
  auto dense = [](const at::Tensor& t) {
    return t.layout() == at::kStrided && (t.device().is_cpu() || t.device().type() == DeviceType::PrivateUse1);
  };
  return self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set()) || (dense(self) && dense(from));
}

// ---- counters, for the tests -------------------------------------------------------------------------------

int64_t resident_bytes() { return resident.load(); }
int64_t peak_bytes() { return peak.load(); }
void reset_peak() { peak.store(resident.load()); }
int64_t value_reads() { return reads.load(); }
int64_t copies_to_host() { return to_host.load(); }
int64_t copies_to_device() { return to_device.load(); }
int64_t blocking_copies_to_host() { return to_host_blocking.load(); }
int64_t host_waits_() { return host_waits.load(); }
int64_t deferred_copies() { return deferred_count.load(); }
std::vector<int64_t> waited_events() {
  std::lock_guard<std::mutex> lock(queue_mutex);
  return waited;
}
void synchronize() { run_deferred(-1, INT64_MAX); }

}  // namespace

C10_REGISTER_GUARD_IMPL(PrivateUse1, StreamGuard);

REGISTER_ALLOCATOR(DeviceType::PrivateUse1, &allocator);

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>()); }

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided_);
  m.impl("as_strided", strided_view);
  m.impl("view", shaped_view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", grow);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Storage", set_whole_storage);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("record_stream", record_stream);
  m.impl("_has_compatible_shallow_copy_type", compatible_shallow_copy);  // also in inference mode
  // CPU's own kernels, not the generic (CompositeExplicitAutograd) ones a new backend gets: same results
  for (const char* name : {"native_group_norm", "native_group_norm_backward", "native_layer_norm",
                           "native_layer_norm_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fallback>());
  }
  m.impl("convolution_overrideable", convolution);
  m.impl("convolution_backward_overrideable", convolution_backward);
}

// A copy from (or into) a lazy conjugate / negative view (complex backward: grad * other.conj()) reaches
// _copy_from with its bit set, which copy_from resolves on the host views. The generic fallback of those keys
// would materialise the view first, with clone -> copy_ -> _copy_from: itself again, forever.
TORCH_LIBRARY_IMPL(aten, Conjugate, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, Negative, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, AutogradPrivateUse1, m) {
  m.impl("_has_compatible_shallow_copy_type", compatible_shallow_copy);
}

// autocast on the test device: CUDA's lists and policies (as aten/src/ATen/autocast_mode.cpp registers them)
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) { m.fallback(torch::CppFunction::makeFallthrough()); }

namespace at::autocast {
TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
#define LOWER(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, lower_precision_fp)
#define FP32(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32)
#define FP32_SET_OPT_DTYPE(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32_set_opt_dtype)
#define PROMOTE(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, promote)
  AT_FORALL_LOWER_PRECISION_FP(LOWER)
  AT_FORALL_FP32(FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(FP32_SET_OPT_DTYPE)
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(KERNEL_DIFFERENT_REDISPATCH_SIGNATURE_PRIVATEUSEONE)
  AT_FORALL_PROMOTE(PROMOTE)
}
}  // namespace at::autocast

TORCH_LIBRARY(fakegpu, m) {
  m.def("resident_bytes", &resident_bytes);
  m.def("peak_bytes", &peak_bytes);
  m.def("reset_peak", &reset_peak);
  m.def("value_reads", &value_reads);
  m.def("copies_to_host", &copies_to_host);
  m.def("copies_to_device", &copies_to_device);
  m.def("blocking_copies_to_host", &blocking_copies_to_host);
  m.def("host_waits", &host_waits_);
  m.def("deferred_copies", &deferred_copies);
  m.def("waited_events", &waited_events);
  m.def("synchronize", &synchronize);
}
