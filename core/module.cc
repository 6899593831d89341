#include "core/module.h"

#include "core/error.h"

namespace loom {

Parameter::Parameter(Shape global_shape, InitSpec init, ParamOptions options)
    : global_shape_(global_shape), local_shape_(global_shape), init_(init), options_(options) {
  const TpSplit& s = options_.split;
  LOOM_CHECK(s.size >= 1 && s.rank >= 0 && s.rank < s.size, kConfig,
             "tensor-parallel split rank " << s.rank << " of size " << s.size << " is invalid");
  if (s.axis >= 0 && s.size > 1) {
    LOOM_CHECK(s.axis < global_shape.ndim(), kShape,
               "split axis " << s.axis << " out of range for shape " << global_shape.str());
    int64_t n = global_shape[s.axis];
    LOOM_CHECK(n % s.size == 0, kConfig,
               "dimension " << s.axis << " of shape " << global_shape.str() << " (" << n
                            << ") is not divisible by the tensor-parallel size " << s.size);
    local_shape_[s.axis] = n / s.size;
  }
}

bool Parameter::weight_decay() const {
  if (options_.weight_decay >= 0) return options_.weight_decay == 1;
  return global_shape_.ndim() >= 2;
}

Tensor Parameter::value() const {
  LOOM_CHECK(finalized(), kConfig, "parameter '" << name_ << "' used before ParameterArena::finalize() allocated it");
  return value_;
}
Tensor Parameter::grad() const {
  LOOM_CHECK(finalized(), kConfig, "parameter gradient used before ParameterArena::finalize()");
  return grad_;
}
Tensor Parameter::master() const {
  LOOM_CHECK(finalized(), kConfig, "parameter master weights used before ParameterArena::finalize()");
  return master_;
}

void Module::check_name(const std::string& name) const {
  // Names become dotted paths, HDF5 group names and fields of the snapshot protocol.
  LOOM_CHECK(!name.empty() && name.find_first_of("./|") == std::string::npos, kConfig,
             "module or parameter name '" << name << "' must be non-empty and contain none of '.', '/', '|'");
  for (const Entry& e : entries_)
    LOOM_CHECK(e.name != name, kConfig, "name '" << name << "' registered twice in one module");
}

Parameter& Module::register_parameter(const std::string& name, Shape global_shape, InitSpec init,
                                      ParamOptions options) {
  check_name(name);
  entries_.push_back(Entry{name, std::make_unique<Parameter>(global_shape, init, options), nullptr});
  return *entries_.back().param;
}

void Module::add_child(const std::string& name, std::unique_ptr<Module> child) {
  check_name(name);
  entries_.push_back(Entry{name, nullptr, std::move(child)});
}

void Module::collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>& out) {
  for (Entry& e : entries_) {
    if (e.param) out.emplace_back(prefix + e.name, e.param.get());
    if (e.child) e.child->collect(prefix + e.name + ".", out);
  }
}

std::vector<std::pair<std::string, Parameter*>> Module::named_parameters() {
  std::vector<std::pair<std::string, Parameter*>> out;
  collect("", out);
  return out;
}

std::vector<std::pair<std::string, Module*>> Module::named_children() {
  std::vector<std::pair<std::string, Module*>> out;
  for (Entry& e : entries_)
    if (e.child) out.emplace_back(e.name, e.child.get());
  return out;
}

int64_t Module::num_parameters_global() {
  int64_t n = 0;
  for (auto& [name, p] : named_parameters()) n += p->global_shape().numel();
  return n;
}

}  // namespace loom
