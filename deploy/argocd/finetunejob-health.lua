-- Argo CD health check for finetune.dev/FineTuneJob (resource.customizations.health.finetune.dev_FineTuneJob).
--
-- status.phase is the primary signal; the kstatus conditions (Ready / Reconciling / Stalled) are the
-- fallback, and a True Stalled condition (e.g. ProgressDeadlineExceeded while Running) is Degraded.
--   Succeeded              -> Healthy
--   Failed                 -> Degraded     (reason: message)
--   Suspended              -> Suspended    (runPolicy.suspend, or a queue such as Kueue has not admitted it)
--   Pending, Running       -> Progressing  (with the epoch when the trainer reports progress)
--   status not yet written, or older than the spec -> Progressing
-- Written for Lua 5.1 (gopher-lua, which Argo CD embeds): no goto, no integer division.
local hs = {}

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(status, kind)
  local c = condition(status, kind)
  return c ~= nil and c.status == "True"
end

local function describe(status, fallback)
  local reason = status.reason
  local message = status.message
  if message ~= nil and message ~= "" then
    if reason ~= nil and reason ~= "" then
      return reason .. ": " .. message
    end
    return message
  end
  if reason ~= nil and reason ~= "" then
    return reason
  end
  return fallback
end

local status = obj.status
if status == nil or (status.phase == nil and status.conditions == nil) then
  hs.status = "Progressing"
  hs.message = "Waiting for the finetune-operator to pick up the job"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(status, "Training finished")
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status, "Training failed")
  return hs
end
if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(status, "Suspended")
  return hs
end
if is_true(status, "Stalled") then
  local c = condition(status, "Stalled")
  hs.status = "Degraded"
  hs.message = (c.reason or "Stalled") .. ": " .. (c.message or "")
  return hs
end
if phase == "Pending" or phase == "Running" then
  hs.status = "Progressing"
  local text = describe(status, phase)
  if phase == "Running" and status.progress ~= nil and status.progress.epochText ~= nil then
    text = "epoch " .. status.progress.epochText .. ": " .. text
  end
  hs.message = text
  return hs
end

-- No known phase: fall back to the kstatus conditions (what Flux reads too).
if is_true(status, "Ready") then
  hs.status = "Healthy"
elseif is_true(status, "Reconciling") then
  hs.status = "Progressing"
else
  hs.status = "Unknown"
end
hs.message = describe(status, "phase " .. tostring(phase))
return hs
