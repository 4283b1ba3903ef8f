# Batch conversion, included by the top-level Makefile (see docs/batch.md):
#
#   make convert MODELS="path/a path/b" DIRECTION=refusal_dir.pth OUT=converted -j2
#
# converts each model into $(OUT)/<folder name>/. The target of each model is its record
# $(OUT)/<name>/orthopatch.json, which orthopatch writes last: a conversion that failed or was
# interrupted leaves no record, or one older than what changed, so make never takes it for done.
# A model is converted again when the direction file or the model's shards, config or index are newer
# than its record, or when ORTHOPATCH_FLAGS, DIRECTION or the model's path changed (a stamp per model
# in $(OUT)/.orthopatch-flags/ holds them, rewritten only when they differ). Paths must not hold
# spaces, colons or '$'.

VENV ?= .venv
MODELS ?=
DIRECTION ?=
OUT ?= converted
ORTHOPATCH_FLAGS ?=

# The orthopatch command: the project's own (installed on demand), unless ORTHOPATCH is given.
ifeq ($(origin ORTHOPATCH),undefined)
ORTHOPATCH := $(VENV)/bin/orthopatch
CONVERT_TOOL := $(VENV)/.installed
else
CONVERT_TOOL :=
endif

CONVERT_STAMPS := $(OUT)/.orthopatch-flags

# $(call convert_name,MODEL): the output folder name: the last path part, without an @revision.
convert_name = $(firstword $(subst @, ,$(notdir $(patsubst %/,%,$(1)))))
# $(call convert_inputs,MODEL): the files whose changes call for a new conversion.
convert_inputs = $(wildcard $(DIRECTION)) $(wildcard $(1)/*.safetensors $(1)/*.json)
# $(call convert_quote,TEXT): TEXT as one single-quoted shell word.
convert_quote = '$(subst ','\'',$(1))'

CONVERT_NAMES := $(foreach m,$(MODELS),$(call convert_name,$(m)))
CONVERT_TARGETS := $(foreach n,$(CONVERT_NAMES),$(OUT)/$(n)/orthopatch.json)

ifneq ($(filter convert,$(MAKECMDGOALS)),)
ifeq ($(strip $(MODELS)),)
$(error convert: set MODELS to the model folders, e.g. make convert MODELS="a b" DIRECTION=refusal_dir.pth)
endif
ifeq ($(strip $(DIRECTION)),)
$(error convert: set DIRECTION to the direction file (or REPO_ID:PATH))
endif
ifneq ($(words $(CONVERT_NAMES)),$(words $(sort $(CONVERT_NAMES))))
$(error convert: two MODELS have the same folder name; each is written to $(OUT)/<folder name>)
endif
endif

.DELETE_ON_ERROR:
.PHONY: convert FORCE

# No recipe: with every record up to date, `make convert` does nothing and `make -q convert` is 0.
convert: $(CONVERT_TARGETS)

# One model: $(1) as given in MODELS, $(2) its folder name in $(OUT).
define convert_model
convert_text_$(2) := $$(strip flags=$$(ORTHOPATCH_FLAGS) direction=$$(DIRECTION) model=$(1))

$(OUT)/$(2)/orthopatch.json: $(CONVERT_STAMPS)/$(2) $(call convert_inputs,$(1)) | $(CONVERT_TOOL)
	$$(ORTHOPATCH) apply $(1) $$(DIRECTION) -o $(OUT)/$(2) --overwrite $$(ORTHOPATCH_FLAGS)
	touch -c $$@ && test -f $$@

ifneq ($$(file <$(CONVERT_STAMPS)/$(2)),$$(convert_text_$(2)))
$(CONVERT_STAMPS)/$(2): FORCE
endif
endef

$(foreach m,$(MODELS),$(eval $(call convert_model,$(m),$(call convert_name,$(m)))))

$(CONVERT_STAMPS)/%:
	@mkdir -p $(@D)
	@printf '%s\n' $(call convert_quote,$(convert_text_$*)) > $@

FORCE:
