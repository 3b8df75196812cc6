-- Argo CD health check for finetune.dev/FineTuneSweep (resource.customizations.health.finetune.dev_FineTuneSweep).
--
-- status.phase is the primary signal, the kstatus conditions (Ready / Reconciling / Stalled) the fallback.
--   Succeeded              -> Healthy      (the best trial and its metric)
--   Failed                 -> Degraded     (reason: message, e.g. TooManyFailedTrials)
--   Pending, Running       -> Progressing  (finished/total trials)
--   status not yet written, or older than the spec -> Progressing
-- Trials are FineTuneJobs the sweep owns: Argo CD shows their own health (finetunejob-health.lua) below it.
-- Written for Lua 5.1 (gopher-lua, which Argo CD embeds).
local hs = {}

local function is_true(status, kind)
  if status.conditions == nil then
    return false
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c.status == "True"
    end
  end
  return false
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
  hs.message = "Waiting for the finetune-operator to pick up the sweep"
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
  local text = describe(status, "Sweep finished")
  if status.best ~= nil and status.best.job ~= nil then
    text = "best " .. status.best.job .. " (" .. tostring(status.best.metric) .. "): " .. text
  end
  hs.message = text
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status, "Sweep failed")
  return hs
end
if phase == "Pending" or phase == "Running" then
  hs.status = "Progressing"
  local text = describe(status, phase)
  if status.trialsText ~= nil then
    text = "trials " .. status.trialsText .. ": " .. text
  end
  hs.message = text
  return hs
end

if is_true(status, "Ready") then
  hs.status = "Healthy"
elseif is_true(status, "Stalled") then
  hs.status = "Degraded"
elseif is_true(status, "Reconciling") then
  hs.status = "Progressing"
else
  hs.status = "Unknown"
end
hs.message = describe(status, "phase " .. tostring(phase))
return hs
