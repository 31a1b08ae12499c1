locals {
  tags = merge(var.tags, { "karrots:module" = "ecr" })
}

# Private, with every optional feature off, as the seed sets it up.
resource "aws_ecr_repository" "main" {
  name                 = var.name
  image_tag_mutability = "MUTABLE"

  image_scanning_configuration {
    scan_on_push = false
  }

  tags = local.tags
}
