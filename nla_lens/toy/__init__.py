"""The bundled toy NLA: a small Shakespeare LM, its AV and AR, trained offline by `nla_lens.toy.train`."""
