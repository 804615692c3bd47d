/*
 * convert_spm.c - a bounds-checked reader of SentencePiece ModelProto files
 * (tokenizer.model, protobuf), for optiml-convert --hf. Fuzzed by
 * fuzz/fuzz_spm_model.c.
 */
#define _POSIX_C_SOURCE 200809L
#include "convert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- SentencePiece ModelProto reader --------------------------------------------
 *
 * Protobuf wire format: a message is a sequence of fields, each a varint key
 * (field_number << 3 | wire_type) then a value: wire type 0 varint, 1 fixed
 * 64 bits, 2 varint length + bytes (strings, sub-messages), 5 fixed 32 bits
 * (3 and 4, groups, are deprecated and rejected). Varints are little-endian
 * base-128, at most 10 bytes. The fields we read:
 *
 *   ModelProto      1 pieces (repeated SentencePiece)  2 trainer_spec
 *                   3 normalizer_spec
 *   SentencePiece   1 piece (string)  2 score (float)  3 type (enum:
 *                   NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
 *                   UNUSED 5, BYTE 6; default NORMAL)
 *   TrainerSpec     40 unk_id  41 bos_id  42 eos_id  43 pad_id  (int32)
 *   NormalizerSpec  3 add_dummy_prefix (bool, default true)
 *
 * Everything else is skipped by its wire type.
 */

struct spm_reader {
    const uint8_t *buf;
    uint64_t pos, end; /* the current message is buf[pos, end) */
    const char *name;
};

static optiml_status spm_read_varint(struct spm_reader *r, uint64_t *out) {
    uint64_t v = 0;
    uint64_t start = r->pos;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->pos >= r->end)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: truncated varint at offset %llu", r->name,
                               (unsigned long long)start);
        uint8_t b = r->buf[r->pos++];
        if (shift == 63 && b > 1)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: varint at offset %llu overflows 64 bits",
                               r->name, (unsigned long long)start);
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return OPTIML_OK;
        }
    }
    return optiml_fail(OPTIML_ERR_FORMAT, "%s: varint at offset %llu is longer than 10 bytes",
                       r->name, (unsigned long long)start);
}

/* The next field's key; field numbers start at 1. */
static optiml_status spm_read_key(struct spm_reader *r, uint32_t *field, uint32_t *wire) {
    uint64_t start = r->pos, key = 0;
    TRY(spm_read_varint(r, &key));
    if (key >> 3 == 0 || key >> 3 > 0x1fffffff)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: bad field number %llu at offset %llu", r->name,
                           (unsigned long long)(key >> 3), (unsigned long long)start);
    *field = (uint32_t)(key >> 3);
    *wire = (uint32_t)(key & 7);
    return OPTIML_OK;
}

/* A length-delimited value: its bytes are buf[*begin, *begin + *len). */
static optiml_status spm_read_bytes(struct spm_reader *r, uint64_t *begin, uint64_t *len) {
    uint64_t start = r->pos;
    TRY(spm_read_varint(r, len));
    if (*len > r->end - r->pos)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: length %llu at offset %llu runs past the end of its message "
                           "(offset %llu)",
                           r->name, (unsigned long long)*len, (unsigned long long)start,
                           (unsigned long long)r->end);
    *begin = r->pos;
    r->pos += *len;
    return OPTIML_OK;
}

static optiml_status spm_read_fixed32(struct spm_reader *r, uint32_t *out) {
    if (r->end - r->pos < 4)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: truncated fixed32 at offset %llu", r->name,
                           (unsigned long long)r->pos);
    const uint8_t *p = r->buf + r->pos;
    *out = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    r->pos += 4;
    return OPTIML_OK;
}

static optiml_status spm_skip(struct spm_reader *r, uint32_t field, uint32_t wire) {
    uint64_t v = 0, begin = 0;
    uint32_t u = 0;
    switch (wire) {
    case 0: return spm_read_varint(r, &v);
    case 1:
        if (r->end - r->pos < 8)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: truncated fixed64 at offset %llu", r->name,
                               (unsigned long long)r->pos);
        r->pos += 8;
        return OPTIML_OK;
    case 2: return spm_read_bytes(r, &begin, &v);
    case 5: return spm_read_fixed32(r, &u);
    default:
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: field %u has unsupported wire type %u at "
                           "offset %llu",
                           r->name, field, wire, (unsigned long long)r->pos);
    }
}

/* A field we know must come with the wire type we expect. */
static optiml_status spm_expect_wire(const struct spm_reader *r, uint32_t field, uint32_t wire,
                                     uint32_t want, const char *what) {
    if (wire == want) return OPTIML_OK;
    return optiml_fail(OPTIML_ERR_FORMAT, "%s: %s (field %u) has wire type %u, expected %u "
                       "(before offset %llu)",
                       r->name, what, field, wire, want, (unsigned long long)r->pos);
}

/* A sub-message reader over buf[begin, begin + len). */
static struct spm_reader spm_sub(const struct spm_reader *r, uint64_t begin, uint64_t len) {
    struct spm_reader s = {r->buf, begin, begin + len, r->name};
    return s;
}

static optiml_status spm_read_piece(struct spm_reader *r, uint32_t index, struct spm_piece *p) {
    bool have_piece = false;
    uint64_t start = r->pos;
    p->score = 0.0f;
    p->type = CONVERT_TOKEN_NORMAL;
    while (r->pos < r->end) {
        uint32_t field = 0, wire = 0;
        TRY(spm_read_key(r, &field, &wire));
        if (field == 1) {
            uint64_t begin = 0, len = 0;
            TRY(spm_expect_wire(r, field, wire, 2, "SentencePiece.piece"));
            TRY(spm_read_bytes(r, &begin, &len));
            if (len > UINT32_MAX)
                return optiml_fail(OPTIML_ERR_FORMAT, "%s: piece %u is too long", r->name, index);
            p->piece = (const char *)r->buf + begin;
            p->len = (uint32_t)len;
            have_piece = true;
        } else if (field == 2) {
            uint32_t bits = 0;
            TRY(spm_expect_wire(r, field, wire, 5, "SentencePiece.score"));
            TRY(spm_read_fixed32(r, &bits));
            memcpy(&p->score, &bits, 4);
            if (p->score != p->score)
                return optiml_fail(OPTIML_ERR_FORMAT, "%s: piece %u: score is NaN", r->name, index);
        } else if (field == 3) {
            uint64_t v = 0;
            TRY(spm_expect_wire(r, field, wire, 0, "SentencePiece.type"));
            TRY(spm_read_varint(r, &v));
            if (v < CONVERT_TOKEN_NORMAL || v > CONVERT_TOKEN_BYTE)
                return optiml_fail(OPTIML_ERR_FORMAT, "%s: piece %u: unknown type %llu", r->name,
                                   index, (unsigned long long)v);
            p->type = (int32_t)v;
        } else {
            TRY(spm_skip(r, field, wire));
        }
    }
    if (!have_piece)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: piece %u (offset %llu) has no text", r->name,
                           index, (unsigned long long)start);
    return OPTIML_OK;
}

static optiml_status spm_read_trainer_spec(struct spm_reader *r, struct spm_model *m) {
    while (r->pos < r->end) {
        uint32_t field = 0, wire = 0;
        TRY(spm_read_key(r, &field, &wire));
        int32_t *id = field == 40 ? &m->unk_id
                      : field == 41 ? &m->bos_id
                      : field == 42 ? &m->eos_id
                      : field == 43 ? &m->pad_id
                                    : NULL;
        if (!id) {
            TRY(spm_skip(r, field, wire));
            continue;
        }
        uint64_t v = 0;
        TRY(spm_expect_wire(r, field, wire, 0, "TrainerSpec id"));
        TRY(spm_read_varint(r, &v));
        *id = (int32_t)(uint32_t)v; /* int32: negatives are sign-extended to 64 bits */
    }
    return OPTIML_OK;
}

static optiml_status spm_read_normalizer_spec(struct spm_reader *r, struct spm_model *m) {
    while (r->pos < r->end) {
        uint32_t field = 0, wire = 0;
        TRY(spm_read_key(r, &field, &wire));
        if (field != 3) {
            TRY(spm_skip(r, field, wire));
            continue;
        }
        uint64_t v = 0;
        TRY(spm_expect_wire(r, field, wire, 0, "NormalizerSpec.add_dummy_prefix"));
        TRY(spm_read_varint(r, &v));
        m->add_dummy_prefix = v != 0;
    }
    return OPTIML_OK;
}

void spm_model_free(struct spm_model *m) {
    if (!m) return;
    free(m->pieces);
    free(m);
}

static optiml_status spm_model_read(struct spm_reader *r, struct spm_model *m) {
    uint32_t cap = 0;
    while (r->pos < r->end) {
        uint32_t field = 0, wire = 0;
        TRY(spm_read_key(r, &field, &wire));
        if (field < 1 || field > 3) {
            TRY(spm_skip(r, field, wire));
            continue;
        }
        uint64_t begin = 0, len = 0;
        TRY(spm_expect_wire(r, field, wire, 2, "ModelProto field"));
        TRY(spm_read_bytes(r, &begin, &len));
        struct spm_reader sub = spm_sub(r, begin, len);
        if (field == 2) {
            TRY(spm_read_trainer_spec(&sub, m));
        } else if (field == 3) {
            TRY(spm_read_normalizer_spec(&sub, m));
        } else {
            if (m->n_pieces == UINT32_MAX / 2)
                return optiml_fail(OPTIML_ERR_FORMAT, "%s: too many pieces", r->name);
            if (m->n_pieces == cap) {
                uint32_t c = cap ? cap * 2 : 1024;
                struct spm_piece *p = realloc(m->pieces, (size_t)c * sizeof(*p));
                if (!p) return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", r->name);
                m->pieces = p;
                cap = c;
            }
            TRY(spm_read_piece(&sub, m->n_pieces, &m->pieces[m->n_pieces]));
            m->n_pieces++;
        }
    }
    if (m->n_pieces == 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: no pieces: not a SentencePiece model?", r->name);
    return OPTIML_OK;
}

optiml_status spm_model_parse(const void *buf, uint64_t size, const char *name,
                              struct spm_model **out) {
    *out = NULL;
    if (!name) name = "tokenizer.model";
    if (!buf && size) return optiml_fail(OPTIML_ERR_INVALID_ARG, "%s: NULL buffer", name);
    struct spm_model *m = calloc(1, sizeof(*m));
    if (!m) return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", name);
    m->add_dummy_prefix = true;
    m->unk_id = 0;
    m->bos_id = 1;
    m->eos_id = 2;
    m->pad_id = -1;
    struct spm_reader r = {buf, 0, size, name};
    optiml_status st = spm_model_read(&r, m);
    if (st != OPTIML_OK) {
        spm_model_free(m);
        return st;
    }
    *out = m;
    return OPTIML_OK;
}
