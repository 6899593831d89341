// Module API: a model is a tree of Modules, each registering its Parameters and child Modules by name.
// Names join with dots ("blocks.3.attn.wq.weight"). Registration only declares shapes; ParameterArena::finalize
// (core/param_arena.h) later lays every parameter of the tree out in one allocation and initialises it, after
// which Parameter::value() gives the weights an op uses and whose gradient lands in the arena.
//
//   class Mlp : public loom::Module {
//    public:
//     Mlp(int64_t d) : up_(register_module<loom::Linear>("up", d, 4 * d)),
//                      down_(register_module<loom::Linear>("down", 4 * d, d)) {}
//     loom::Tensor forward(loom::Ctx& c, loom::Tensor x) { return down_(c, ops::silu(c, up_(c, x))); }
//    private:
//     loom::Linear& up_; loom::Linear& down_;
//   };
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace loom {

// How a parameter starts. Normal draws are a pure function of (seed, parameter name, global element index),
// so the same full tensor results for any tensor-parallel split.
struct InitSpec {
  enum class Kind { kZeros, kOnes, kNormal };
  Kind kind = Kind::kNormal;
  float std = 0.02f;
  static InitSpec zeros() { return {Kind::kZeros, 0}; }
  static InitSpec ones() { return {Kind::kOnes, 0}; }
  static InitSpec normal(float std) { return {Kind::kNormal, std}; }
};

// Tensor-parallel split: which axis of the global shape is divided over `size` ranks (axis -1: replicated).
struct TpSplit {
  int axis = -1;
  int rank = 0;
  int size = 1;
  bool replicated() const { return axis < 0 || size == 1; }
};

struct ParamOptions {
  TpSplit split;
  // Decoupled weight decay applies by default to parameters with two or more dimensions.
  int weight_decay = -1;  // -1: by rank, 0: never, 1: always
};

class Parameter {
 public:
  Parameter(Shape global_shape, InitSpec init, ParamOptions options);

  const std::string& name() const { return name_; }  // full dotted name, set by ParameterArena::finalize
  const Shape& global_shape() const { return global_shape_; }
  const Shape& local_shape() const { return local_shape_; }
  const TpSplit& split() const { return options_.split; }
  const InitSpec& init() const { return init_; }
  bool weight_decay() const;
  bool finalized() const { return index_ >= 0; }
  int index() const { return index_; }

  // The compute-precision weights (f32 on CPU, bf16 on CUDA); gradients of ops that use it land in grad().
  Tensor value() const;
  Tensor grad() const;    // this parameter's slice of the arena's gradient region
  Tensor master() const;  // f32 master weights

 private:
  friend class ParameterArena;
  Shape global_shape_;
  Shape local_shape_;
  InitSpec init_;
  ParamOptions options_;
  std::string name_;
  int index_ = -1;
  Tensor value_, grad_, master_;
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter of this module and its descendants, depth-first in registration order, with dotted names
  // relative to this module.
  std::vector<std::pair<std::string, Parameter*>> named_parameters();
  std::vector<std::pair<std::string, Module*>> named_children();
  int64_t num_parameters_global();  // sum of global numels (the model's size, whatever the TP split)

 protected:
  Parameter& register_parameter(const std::string& name, Shape global_shape, InitSpec init, ParamOptions options = {});
  template <class M, class... Args>
  M& register_module(const std::string& name, Args&&... args) {
    auto child = std::make_unique<M>(std::forward<Args>(args)...);
    M& ref = *child;
    add_child(name, std::move(child));
    return ref;
  }
  void add_child(const std::string& name, std::unique_ptr<Module> child);

 private:
  void check_name(const std::string& name) const;
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Parameter*>>& out);
  // Registration order is kept across parameters and children, so names come out the way they were declared.
  struct Entry {
    std::string name;
    std::unique_ptr<Parameter> param;
    std::unique_ptr<Module> child;
  };
  std::vector<Entry> entries_;
};

// A list of child modules named "0", "1", ...
class ModuleList : public Module {
 public:
  template <class M, class... Args>
  M& append(Args&&... args) {
    M& m = register_module<M>(std::to_string(items_.size()), std::forward<Args>(args)...);
    items_.push_back(&m);
    return m;
  }
  size_t size() const { return items_.size(); }
  Module& operator[](size_t i) const { return *items_.at(i); }
  template <class M>
  M& at(size_t i) const {
    return static_cast<M&>(*items_.at(i));
  }

 private:
  std::vector<Module*> items_;
};

}  // namespace loom
