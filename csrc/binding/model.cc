// N-API glue for LlamaModel: an ObjectWrap whose long calls run on the object's own worker
// thread (JobQueue) and return Promises. Inputs are copied on the JS thread before queueing, so JS
// may reuse its arrays at once; outputs are copied into fresh typed arrays on the JS thread.
#include <cstring>
#include <memory>
#include <vector>

#include "binding/util.h"
#include "binding/worker.h"
#include "model/llama.h"

namespace lima::binding {
namespace {

int64_t prop_int(Napi::Object o, const char* key, int64_t min_value) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_type(o.Env(), "a number", key, describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < static_cast<double>(min_value))
    throw_range(o.Env(), "an integer >= " + std::to_string(min_value), key, describe(v));
  return static_cast<int64_t>(d);
}

double prop_num(Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_type(o.Env(), "a number", key, describe(v));
  return v.As<Napi::Number>().DoubleValue();
}

LlamaConfig parse_config(const Napi::Value& v) {
  if (!v.IsObject()) throw_type(v.Env(), "a config object", "config", describe(v));
  Napi::Object o = v.As<Napi::Object>();
  LlamaConfig c;
  c.V = prop_int(o, "vocabSize", 1);
  c.C = prop_int(o, "hiddenSize", 1);
  c.F = prop_int(o, "intermediateSize", 1);
  c.L = prop_int(o, "numLayers", 1);
  c.H = prop_int(o, "numHeads", 1);
  c.KV = prop_int(o, "numKvHeads", 1);
  c.hd = prop_int(o, "headDim", 1);
  c.eps = static_cast<float>(prop_num(o, "rmsNormEps"));
  c.theta = static_cast<float>(prop_num(o, "ropeTheta"));
  c.max_pos = prop_int(o, "maxPositionEmbeddings", 1);
  c.tied = o.Get("tieWordEmbeddings").ToBoolean();
  Napi::Value rs = o.Get("ropeScaling");
  if (rs.IsObject()) {
    Napi::Object r = rs.As<Napi::Object>();
    c.rope_scaling.type = RopeScaling::Llama3;
    c.rope_scaling.factor = static_cast<float>(prop_num(r, "factor"));
    c.rope_scaling.low_freq_factor = static_cast<float>(prop_num(r, "lowFreqFactor"));
    c.rope_scaling.high_freq_factor = static_cast<float>(prop_num(r, "highFreqFactor"));
    c.rope_scaling.original_max_position_embeddings = prop_int(r, "originalMaxPositionEmbeddings", 1);
  }
  return c;
}

Napi::Float32Array copy_out(Napi::Env env, const float* src, int64_t n) {
  auto a = Napi::Float32Array::New(env, static_cast<size_t>(n));
  std::memcpy(a.Data(), src, sizeof(float) * n);
  return a;
}

std::vector<int32_t> copy_i32(const Napi::CallbackInfo& info, size_t i, const char* name, int64_t len) {
  const int32_t* p = i32(info, i, name, len);
  return std::vector<int32_t>(p, p + len);
}

class NativeLlama : public Napi::ObjectWrap<NativeLlama> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeLlama",
                       {InstanceMethod<&NativeLlama::G<&NativeLlama::Info>>("info"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::SetTensor>>("setTensor"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::GetTensor>>("getTensor"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::GetGrad>>("getGrad"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::ZeroGrads>>("zeroGrads"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::InitNormal>>("initNormal"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::TrainStep>>("trainStep"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::ForwardLoss>>("forwardLoss"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::Decode>>("decode"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::ResetCache>>("resetCache"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::AdamwStep>>("adamwStep"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::GradSqNorm>>("gradSqNorm"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::GetMoment>>("getMoment"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::SetMoment>>("setMoment"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::Dispose>>("dispose"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::Paths>>("paths"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::SetRecompute>>("setRecompute"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::EnableLora>>("enableLora"),
                        InstanceMethod<&NativeLlama::G<&NativeLlama::LoraParams>>("loraParams"),
                        StaticMethod<&guarded<&NativeLlama::ActivationBytes>>("activationBytes")});
  }

  // new NativeLlama(config, precision?: 'fp32' | 'bf16', device?) — the device as make_model_backend takes it
  explicit NativeLlama(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeLlama>(info) {
    const LlamaConfig c = parse_config(info[0]);
    const DType dt = parse_precision(info, 1);
    try {
      model_ = std::make_unique<LlamaModel>(c, make_model_backend(info, 2), dt);
    } catch (...) {
      throw to_js_error(info.Env(), std::current_exception());
    }
    jobs_ = std::make_unique<JobQueue>("lima-native model");
  }

 private:
  LlamaModel& model(Napi::Env env) {
    if (!model_ || jobs_->closed()) throw disposed_error(env);
    return *model_;
  }

  static DType parse_precision(const Napi::CallbackInfo& info, size_t i) {
    Napi::Value v = info[i];
    if (v.IsUndefined() || v.IsNull()) return DType::F32;
    const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
    if (s == "fp32") return DType::F32;
    if (s == "bf16") return DType::BF16;
    throw_type(info.Env(), "'fp32' | 'bf16'", "precision", v.IsString() ? "'" + s + "'" : describe(v));
  }

  // 'none' | 'mlp' | 'all' (undefined: 'none'), see Recompute in model/llama.h.
  static Recompute parse_recompute(const Napi::CallbackInfo& info, size_t i) {
    Napi::Value v = info[i];
    if (v.IsUndefined() || v.IsNull()) return Recompute::None;
    const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
    if (s == "none") return Recompute::None;
    if (s == "mlp") return Recompute::Mlp;
    if (s == "all") return Recompute::All;
    throw_type(info.Env(), "'none' | 'mlp' | 'all'", "recompute", v.IsString() ? "'" + s + "'" : describe(v));
  }

  // Every method runs guarded: no C++ exception reaches N-API (which would abort the process).
  template <Napi::Value (NativeLlama::*M)(const Napi::CallbackInfo&)>
  Napi::Value G(const Napi::CallbackInfo& info) {
    try {
      return (this->*M)(info);
    } catch (const Napi::Error&) {
      throw;
    } catch (...) {
      throw to_js_error(info.Env(), std::current_exception());
    }
  }

  const ParamInfo& param(const Napi::CallbackInfo& info, size_t i) {
    if (!info[i].IsString()) throw_type(info.Env(), "a parameter name", "name", describe(info[i]));
    const std::string name = info[i].As<Napi::String>().Utf8Value();
    LlamaModel& m = model(info.Env());
    const ParamInfo* p = m.find(name);
    for (const ParamInfo& q : m.lora_params())
      if (!p && q.name == name) p = &q;
    if (!p) throw_range(info.Env(), "the name of a model parameter", "name", "\"" + name + "\"");
    return *p;
  }

  static Napi::Array param_list(Napi::Env env, const std::vector<ParamInfo>& ps) {
    Napi::Array params = Napi::Array::New(env, ps.size());
    for (size_t i = 0; i < ps.size(); ++i) {
      const ParamInfo& p = ps[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", p.name);
      Napi::Array shape = Napi::Array::New(env, p.shape.size());
      for (size_t d = 0; d < p.shape.size(); ++d) shape.Set(d, Napi::Number::New(env, static_cast<double>(p.shape[d])));
      o.Set("shape", shape);
      o.Set("numel", Napi::Number::New(env, static_cast<double>(p.numel)));
      o.Set("decay", Napi::Boolean::New(env, p.decay));
      params.Set(i, o);
    }
    return params;
  }

  // enableLora({r, alpha, dropout, targets: string[], rslora}, seed, tokens?: number[]) ->
  // Promise<void> (checked here; the model checks again on the worker, ids' range and
  // distinctness there). tokens: the trainable token rows (LoraConfig::tokens).
  Napi::Value EnableLora(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    if (!info[0].IsObject()) throw_type(info.Env(), "a LoRA config object", "lora", describe(info[0]));
    Napi::Object o = info[0].As<Napi::Object>();
    LoraConfig c;
    c.r = prop_int(o, "r", 1);
    c.alpha = prop_num(o, "alpha");
    c.dropout = static_cast<float>(prop_num(o, "dropout"));
    c.rslora = o.Get("rslora").ToBoolean();
    Napi::Value t = o.Get("targets");
    if (!t.IsArray()) throw_type(info.Env(), "an array of projection names", "targets", describe(t));
    Napi::Array ta = t.As<Napi::Array>();
    for (uint32_t i = 0; i < ta.Length(); ++i) {
      Napi::Value v = ta.Get(i);
      const std::string name = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
      int found = -1;
      for (int k = 0; k < kLoraProjections; ++k)
        if (name == kLoraTargets[k]) found = k;
      if (found < 0) throw_range(info.Env(), "one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", "targets", describe(v));
      c.targets |= 1u << found;
    }
    c.seed = static_cast<uint64_t>(integer(info, 1, "seed"));
    if (!info[2].IsUndefined() && !info[2].IsNull()) {
      if (!info[2].IsArray()) throw_type(info.Env(), "an array of token ids", "trainableTokens", describe(info[2]));
      Napi::Array ids = info[2].As<Napi::Array>();
      for (uint32_t i = 0; i < ids.Length(); ++i) {
        Napi::Value v = ids.Get(i);
        const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!(d >= 0 && d <= 2147483647.0 && d == static_cast<double>(static_cast<int64_t>(d))))
          throw_range(info.Env(), "a token id (an integer >= 0)", ("trainableTokens[" + std::to_string(i) + "]").c_str(),
                      describe(v));
        c.tokens.push_back(static_cast<int32_t>(d));
      }
    }
    return jobs_->enqueue(info.Env(), Value(), [m, c]() -> JobQueue::Result {
      m->enable_lora(c);
      return nullptr;
    });
  }

  // loraParams() -> [{name, shape, numel, decay}]: the adapters' tensors in model order ([] without).
  Napi::Value LoraParams(const Napi::CallbackInfo& info) {
    return param_list(info.Env(), model(info.Env()).lora_params());
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    LlamaModel& m = model(env);
    Napi::Object out = Napi::Object::New(env);
    out.Set("params", param_list(env, m.params()));
    out.Set("numParams", Napi::Number::New(env, static_cast<double>(m.num_params())));
    out.Set("precision", Napi::String::New(env, dtype_name(m.compute_dtype())));
    out.Set("device", Napi::String::New(env, m.backend().device()));
    return out;
  }

  // paths() -> {isa, bf16Path}: the code paths this model's ops take now.
  Napi::Value Paths(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    LlamaModel& m = model(env);
    Napi::Object out = Napi::Object::New(env);
    out.Set("isa", m.backend().fp32_path());
    out.Set("bf16Path", m.backend().bf16_path());
    return out;
  }

  // setRecompute('none' | 'mlp' | 'all') -> Promise<void>: queued, so it never frees the
  // activations under a running step.
  Napi::Value SetRecompute(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    if (!info[0].IsString()) throw_type(info.Env(), "'none' | 'mlp' | 'all'", "recompute", describe(info[0]));
    const Recompute r = parse_recompute(info, 0);
    return jobs_->enqueue(info.Env(), Value(), [m, r]() -> JobQueue::Result {
      m->set_recompute(r);
      return nullptr;
    });
  }

  Napi::Value SetTensor(const Napi::CallbackInfo& info) { return Write(info, ParamKind::Weight, 1); }
  Napi::Value GetTensor(const Napi::CallbackInfo& info) { return Read(info, ParamKind::Weight); }
  Napi::Value GetGrad(const Napi::CallbackInfo& info) { return Read(info, ParamKind::Grad); }

  // Parameters cross by name: the binding never sees where the model keeps them.
  Napi::Value Read(const Napi::CallbackInfo& info, ParamKind kind) {
    const ParamInfo& p = param(info, 0);
    LlamaModel* m = model_.get();
    const std::string name = p.name;
    const int64_t n = p.numel;
    return jobs_->enqueue(info.Env(), Value(), [m, name, n, kind]() -> JobQueue::Result {
      auto copy = std::make_shared<std::vector<float>>(n);
      m->read_param(name, kind, copy->data());
      return [copy](Napi::Env env) -> Napi::Value { return copy_out(env, copy->data(), copy->size()); };
    });
  }

  Napi::Value Write(const Napi::CallbackInfo& info, ParamKind kind, size_t data_arg) {
    const ParamInfo& p = param(info, 0);
    const float* src = f32(info, data_arg, p.name.c_str(), p.numel);
    auto data = std::make_shared<std::vector<float>>(src, src + p.numel);
    LlamaModel* m = model_.get();
    const std::string name = p.name;
    return jobs_->enqueue(info.Env(), Value(), [m, data, name, kind]() -> JobQueue::Result {
      m->write_param(name, kind, data->data());
      return nullptr;
    });
  }

  Napi::Value ZeroGrads(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    return jobs_->enqueue(info.Env(), Value(), [m]() -> JobQueue::Result {
      m->zero_grads();
      return nullptr;
    });
  }

  // initNormal(seed, std) -> Promise<void>
  Napi::Value InitNormal(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    const uint64_t seed = static_cast<uint64_t>(integer(info, 0, "seed"));
    const float std = static_cast<float>(num(info, 1, "std"));
    return jobs_->enqueue(info.Env(), Value(), [m, seed, std]() -> JobQueue::Result {
      m->init_normal(seed, std);
      return nullptr;
    });
  }

  // trainStep(ids, labels, batch, seqLen, norm, {pMax, seed, step, rowOffset}) -> Promise<loss>
  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    const int64_t B = integer(info, 2, "batch", 1), T = integer(info, 3, "seqLen", 1);
    auto ids = std::make_shared<std::vector<int32_t>>(copy_i32(info, 0, "inputIds", B * T));
    auto labels = std::make_shared<std::vector<int32_t>>(copy_i32(info, 1, "labels", B * T));
    const double norm = num(info, 4, "norm");
    DropoutConfig d;
    if (info[5].IsObject()) {
      Napi::Object o = info[5].As<Napi::Object>();
      d.p_max = static_cast<float>(prop_num(o, "pMax"));
      d.seed = static_cast<uint64_t>(prop_int(o, "seed", 0));
      d.step = static_cast<uint64_t>(prop_int(o, "step", 0));
      d.row_offset = prop_int(o, "rowOffset", 0);
    }
    return jobs_->enqueue(info.Env(), Value(), [m, ids, labels, B, T, norm, d]() -> JobQueue::Result {
      const double loss = m->train_step(ids->data(), labels->data(), B, T, norm, d);
      return [loss](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, loss); };
    });
  }

  // forwardLoss(ids, labels | null, batch, seqLen, wantLogits) -> Promise<{lossSum, count, logits?}>
  Napi::Value ForwardLoss(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    const int64_t B = integer(info, 2, "batch", 1), T = integer(info, 3, "seqLen", 1);
    auto ids = std::make_shared<std::vector<int32_t>>(copy_i32(info, 0, "inputIds", B * T));
    std::shared_ptr<std::vector<int32_t>> labels;
    if (!info[1].IsNull() && !info[1].IsUndefined())
      labels = std::make_shared<std::vector<int32_t>>(copy_i32(info, 1, "labels", B * T));
    const bool want_logits = boolean(info, 4, "wantLogits");
    const int64_t V = m->config().V;
    return jobs_->enqueue(info.Env(), Value(), [m, ids, labels, B, T, want_logits, V]() -> JobQueue::Result {
      auto logits = want_logits ? std::make_shared<std::vector<float>>(B * T * V) : nullptr;
      int64_t count = 0;
      const double loss = m->forward_loss(ids->data(), labels ? labels->data() : nullptr, B, T,
                                          &count, logits ? logits->data() : nullptr);
      return [loss, count, logits](Napi::Env env) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("lossSum", Napi::Number::New(env, loss));
        o.Set("count", Napi::Number::New(env, static_cast<double>(count)));
        if (logits) o.Set("logits", copy_out(env, logits->data(), logits->size()));
        return o;
      };
    });
  }

  // decode(ids) -> Promise<Float32Array logits of the last position>
  Napi::Value Decode(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    if (!info[0].IsTypedArray()) throw_type(info.Env(), "an Int32Array", "ids", describe(info[0]));
    const int64_t n = info[0].As<Napi::TypedArray>().ElementLength();
    auto ids = std::make_shared<std::vector<int32_t>>(copy_i32(info, 0, "ids", n));
    return jobs_->enqueue(info.Env(), Value(), [m, ids]() -> JobQueue::Result {
      auto logits = std::make_shared<std::vector<float>>(m->config().V);
      m->decode(logits->data(), ids->data(), static_cast<int64_t>(ids->size()));
      return [logits](Napi::Env env) -> Napi::Value { return copy_out(env, logits->data(), logits->size()); };
    });
  }

  Napi::Value ResetCache(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    return jobs_->enqueue(info.Env(), Value(), [m]() -> JobQueue::Result {
      m->reset_cache();
      return nullptr;
    });
  }

  // adamwStep({lr, beta1, beta2, eps, weightDecay, step, gradScale}) -> Promise<void>
  Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    if (!info[0].IsObject()) throw_type(info.Env(), "an options object", "adamw", describe(info[0]));
    Napi::Object o = info[0].As<Napi::Object>();
    AdamWParams p;
    p.lr = static_cast<float>(prop_num(o, "lr"));
    p.beta1 = static_cast<float>(prop_num(o, "beta1"));
    p.beta2 = static_cast<float>(prop_num(o, "beta2"));
    p.eps = static_cast<float>(prop_num(o, "eps"));
    p.weight_decay = static_cast<float>(prop_num(o, "weightDecay"));
    p.step = prop_int(o, "step", 1);
    p.grad_scale = static_cast<float>(prop_num(o, "gradScale"));
    return jobs_->enqueue(info.Env(), Value(), [m, p]() -> JobQueue::Result {
      m->adamw_step(p);
      return nullptr;
    });
  }

  Napi::Value GradSqNorm(const Napi::CallbackInfo& info) {
    LlamaModel* m = &model(info.Env());
    return jobs_->enqueue(info.Env(), Value(), [m]() -> JobQueue::Result {
      const double s = m->grad_sq_norm();
      return [s](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, s); };
    });
  }

  // getMoment(name, 1 | 2) / setMoment(name, 1 | 2, data): optimizer state for checkpoints.
  Napi::Value GetMoment(const Napi::CallbackInfo& info) {
    param(info, 0);
    return Read(info, integer(info, 1, "moment", 1) == 2 ? ParamKind::Moment2 : ParamKind::Moment1);
  }

  Napi::Value SetMoment(const Napi::CallbackInfo& info) {
    param(info, 0);
    return Write(info, integer(info, 1, "moment", 1) == 2 ? ParamKind::Moment2 : ParamKind::Moment1, 2);
  }

  // Frees the model after the queued jobs; later calls reject with ERR_LIMA_DISPOSED.
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!model_ || jobs_->closed()) {
      auto d = Napi::Promise::Deferred::New(env);
      d.Resolve(env.Undefined());
      return d.Promise();
    }
    std::shared_ptr<LlamaModel> owned(std::move(model_));
    Napi::Promise p = jobs_->enqueue(env, Value(), [owned]() mutable -> JobQueue::Result {
      owned.reset();  // free weights, gradients and activations on the worker
      return nullptr;
    });
    jobs_->close();
    return p;
  }

  static Napi::Value ActivationBytes(const Napi::CallbackInfo& info) {
    const LlamaConfig c = parse_config(info[0]);
    const int64_t B = integer(info, 1, "batch", 1), T = integer(info, 2, "seqLen", 1);
    const DType dt = parse_precision(info, 3);
    const Recompute r = parse_recompute(info, 4);
    // Optional LoRA rank, dropout and trainable token count (their scratch).
    const int64_t lora_r = info[5].IsUndefined() ? 0 : integer(info, 5, "loraRank", 0);
    const bool lora_drop = !info[6].IsUndefined() && boolean(info, 6, "loraDropout");
    const int64_t lora_tokens = info[7].IsUndefined() ? 0 : integer(info, 7, "loraTokens", 0);
    return Napi::Number::New(
        info.Env(), static_cast<double>(LlamaModel::activation_bytes(c, B, T, dt, r, lora_r, lora_drop, lora_tokens)));
  }

  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<JobQueue> jobs_;
};

}  // namespace

void register_model(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeLlama", NativeLlama::Define(env));
}

}  // namespace lima::binding
