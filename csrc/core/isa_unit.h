// The first include of every header that holds per-ISA code: such code lives in namespace
// pt::PT_ISA_NS and is compiled once per kernel set, so the header is for *_isa.cc files only.
#pragma once

#if !defined(PT_ISA_NS)
#error "this header is for *_isa.cc translation units (compiled once per ISA)"
#endif
